"""`bigmodel export-hf`: a run's checkpoint as a Hugging Face directory transformers loads.

Writes config.json, model.safetensors and the run's tokenizer: tokenizer.json with a
tokenizer_config.json naming its special tokens (a byte-tokenizer run gets a tokenizer.json
that maps every byte to the same id as bigmodel's byte tokenizer, end-of-document 256 as
<|endoftext|>; a BERT's [MASK], [CLS] and [SEP] appended after the vocabulary are added at the
ids the run gave them), so `AutoModelForCausalLM` / `AutoModelForMaskedLM` and `AutoTokenizer`
load the folder. A SentencePiece run's tokenizer.model is copied as it is (no tokenizer.json).
Everything is written into a temporary sibling folder that is renamed to --out at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import ml_collections

from bigmodel.config import ConfigError
from bigmodel.data import tokenizers
from bigmodel.hf.conversion import family_for_model
from bigmodel.hf.io import write_checkpoint
from bigmodel.hf.mapping import Family, tree_map

# tokenizer_config.json key -> the tokens that play that part, first found wins.
SPECIAL_ROLES = {"bos_token": ("<s>", "<|begin_of_text|>"), "eos_token": tokenizers.HFTokenizer.EOD_TOKENS,
                 "unk_token": ("[UNK]", "<unk>"), "pad_token": ("[PAD]", "<pad>"), "cls_token": ("[CLS]",),
                 "sep_token": ("[SEP]",), "mask_token": ("[MASK]", "<mask>")}
BYTE_EOD = "<|endoftext|>"


def byte_tokenizer_json() -> str:
    """A tokenizer.json equal to ByteTokenizer: byte b is id b, <|endoftext|> is 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # Byte-level BPE without merges: each byte becomes its printable stand-in, one token per byte.
    tok = Tokenizer(models.BPE(vocab=dict(tokenizers._byte_level_alphabet()), merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BYTE_EOD])
    return tok.to_str()


def write_tokenizer(tokenizer: tokenizers.Tokenizer, out: pathlib.Path, max_len: int,
                    appended: tuple[str, ...] = ()) -> list[str]:
    """The run's tokenizer into `out` in transformers' layout; returns the file names written.

    `appended`: special tokens the run placed right after the tokenizer's ids (a BERT's [MASK],
    [CLS], [SEP] on a byte vocabulary), added to tokenizer.json so they keep those ids.
    """
    from tokenizers import Tokenizer

    name = tokenizers.kind(tokenizer)
    if name == "sentencepiece":
        shutil.copyfile(tokenizer.path, out / "tokenizer.model")
        return ["tokenizer.model"]
    if name not in ("hf", "byte"):
        return []
    tok = Tokenizer.from_file(tokenizer.path) if name == "hf" else Tokenizer.from_str(byte_tokenizer_json())
    if appended:
        tok.add_special_tokens(list(appended))
        got = [tok.token_to_id(t) for t in appended]
        if got != list(range(tokenizer.vocab_size, tokenizer.vocab_size + len(appended))):
            raise ValueError(f"the tokenizer already has some of {appended}; cannot append them after its vocabulary")
    (out / "tokenizer.json").write_text(tok.to_str())
    known = set(tok.get_vocab(with_added_tokens=True))
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len}
    for role, candidates in SPECIAL_ROLES.items():
        found = next((t for t in candidates if t in known), None)
        if found is not None:
            config[role] = found
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return ["tokenizer.json", "tokenizer_config.json"]


def _appended_specials(tokenizer: tokenizers.Tokenizer, family: Family) -> tuple[str, ...]:
    """The BERT specials an MLM run appended after its tokenizer's ids, in id order (none where it has its own)."""
    from bigmodel.data import mlm

    if family.task != "mlm":
        return ()
    ids = mlm.SpecialIds.of(tokenizer)
    if ids.mask < tokenizer.vocab_size:  # the vocabulary's own
        return ()
    return tuple(t for _, t in sorted([(ids.mask, "[MASK]"), (ids.cls, "[CLS]"), (ids.sep, "[SEP]")]))


def run_tokenizer(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> tokenizers.Tokenizer | None:
    """The tokenizer the run kept in WORKDIR/tokenizer/, else the one its config names without data (byte, hf:)."""
    kept = tokenizers.load(workdir)
    if kept is not None:
        return kept
    spec = config.data.get("tokenizer", "")
    if spec == "byte":
        return tokenizers.ByteTokenizer()
    if spec.startswith("hf:") and pathlib.Path(spec[3:]).exists():
        return tokenizers.HFTokenizer(spec[3:])
    return None


def export_hf(workdir: str | os.PathLike, out: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """Write the run's checkpoint (latest or `step`) to `out` as a HF directory; returns what was written."""
    from bigmodel import checkpoint

    workdir, out = pathlib.Path(workdir), pathlib.Path(out)
    if not (workdir / "config.json").is_file():
        raise ConfigError(f"{workdir} has no config.json; pass the --workdir of a bigmodel run")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists and is not empty; pass a new folder")
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    if "model" not in config or "checkpoint" not in config:
        raise ConfigError(f"{workdir}/config.json is not a bigmodel run's config (no model and checkpoint groups); "
                          "pass the --workdir of a bigmodel run")
    model = config.model
    if model.name == "bert" and model.get("head") != "mlm":
        raise ConfigError(f"{workdir} trains a BERT with head {model.get('head')!r}; export-hf writes BERT "
                          "masked-language models (BertForMaskedLM): export the pre-training run")
    try:
        family = family_for_model(model)
    except ValueError as e:
        raise ConfigError(f"{workdir}: {e}") from None
    if model.get("mup"):
        raise ConfigError(f"{workdir} trains a muP GPT, whose logits transformers would compute differently; "
                          "export-hf writes standard-parameterisation models")
    ckpt = checkpoint.Checkpointer(workdir, keep=config.checkpoint.keep, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"{workdir}/checkpoints holds no checkpoint; train (or import-hf) first")
        params = ckpt.restore_raw(step)["params"]
    finally:
        ckpt.close()
    import numpy as np

    state = family.params_to_hf(tree_map(np.asarray, params), model)
    hf_config = family.config_to_hf(model)
    tokenizer = run_tokenizer(workdir, config)
    if tokenizer is not None and tokenizers.kind(tokenizer) != "sentencepiece":
        eod = int(tokenizer.eod_id)
        if family.task == "lm":  # what generation stops at
            hf_config.update(eos_token_id=eod, bos_token_id=eod)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_checkpoint(tmp, state, hf_config)
        files = ["config.json", "model.safetensors"]
        if tokenizer is not None:
            files += write_tokenizer(tokenizer, tmp, int(model.max_len), _appended_specials(tokenizer, family))
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out), "step": step, "architecture": hf_config["architectures"][0], "files": files,
            "tokenizer": tokenizers.kind(tokenizer) if tokenizer is not None else None}


def cmd_export_hf(args: argparse.Namespace) -> int:
    """Export a run and say how to load it."""
    info = export_hf(args.workdir, args.out, args.step)
    auto = "AutoModelForMaskedLM" if info["architecture"].startswith("Bert") else "AutoModelForCausalLM"
    print(f"exported step {info['step']} of {args.workdir} to {info['out']} ({info['architecture']}; "
          f"{', '.join(info['files'])})", flush=True)
    print(f"load: transformers.{auto}.from_pretrained({info['out']!r})", flush=True)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `bigmodel export-hf`."""
    p = subparsers.add_parser(
        "export-hf", help="write a run's checkpoint as a Hugging Face model directory (weights, config, tokenizer)",
        description="Writes OUT/config.json, OUT/model.safetensors and the run's tokenizer (tokenizer.json) for "
                    "transformers' AutoModelForCausalLM / AutoModelForMaskedLM and AutoTokenizer.",
    )
    p.add_argument("--workdir", required=True, help="the run directory (config.json + checkpoints/)")
    p.add_argument("--out", required=True, help="new folder to write the Hugging Face checkpoint to")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.set_defaults(func=cmd_export_hf)
