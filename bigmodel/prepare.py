"""`bigmodel prepare`: tokenize a corpus into a token store (bigmodel.data.store).

  bigmodel prepare --source 'data/*.jsonl.zst' --format jsonl --tokenizer hf:gpt2/tokenizer.json --out stores/owt
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from bigmodel import exit_codes

FORMATS = ("jsonl", "parquet", "text", "tfds", "hf-disk")  # = store.FORMATS, without importing it here


def cmd_prepare(args: argparse.Namespace) -> int:
    """Prepare (or finish preparing) a store and print its summary as JSON."""
    from bigmodel.data import store

    opts = store.Options(
        source=args.source, format=args.format, out=args.out, tokenizer=args.tokenizer, text_key=args.text_key,
        validation_fraction=args.validation_fraction, shard_tokens=args.shard_tokens, processes=args.processes,
        data_dir=args.data_dir, split=args.split,
    )
    manifest = store.prepare(opts, progress=not args.quiet)
    summary = {k: manifest[k] for k in ("documents", "tokens", "bytes")}
    summary.update({f"{s}_tokens": manifest["splits"][s]["tokens"] for s in store.SPLITS})
    summary.update(tokenizer=store.describe_tokenizer(manifest["tokenizer"]), out=args.out)
    for key in ("prepare_s", "text_mb_per_s", "text_mb_per_cpu_s", "processes"):
        if key in manifest:
            summary[key] = manifest[key]
    print(json.dumps(summary), flush=True)
    return exit_codes.OK


def register(sub: Any) -> None:
    """Add `bigmodel prepare`."""
    p = sub.add_parser("prepare", help="tokenize a corpus (jsonl, parquet, text, TFDS, HF on disk) into a token store")
    p.add_argument("--source", required=True,
                   help="a directory, a glob or a file (tfds: the dataset name, or text_files for this Python's "
                        "standard library through the text-files builder; hf-disk: the save_to_disk folder)")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="jsonl (also .gz, .zst), parquet, text (one file = one document), tfds, hf-disk")
    p.add_argument("--out", required=True, help="the store directory (an unfinished one is resumed)")
    p.add_argument("--tokenizer", default="byte",
                   help="byte | hf:tokenizer.json (or its folder) | spm:FILE.model | trained on the corpus: "
                        "bpe:VOCAB (byte-level BPE) or sentencepiece:VOCAB")
    p.add_argument("--text_key", "--text-key", default="text", help="the record field or column holding the text")
    p.add_argument("--validation_fraction", "--validation-fraction", type=float, default=0.01,
                   help="share of documents held out, chosen by a hash of their text")
    p.add_argument("--shard_tokens", "--shard-tokens", type=int, default=1 << 27, help="tokens per shard")
    p.add_argument("--processes", type=int, default=0, help="tokenizing processes; 0 = every core")
    p.add_argument("--data_dir", "--data-dir", default="", help="tfds: the TFDS data_dir")
    p.add_argument("--split", default="train", help="tfds: the split read")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)
