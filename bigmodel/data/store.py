"""Token stores: a corpus tokenized once (`bigmodel prepare`), read by index in training.

Layout of a store directory OUT (local, or anywhere etils.epath opens):

  OUT/manifest.json            written last: documents, tokens, bytes, tokenizer (kind, name,
                               SHA-256), source files (size, SHA-256), the split rule, and per
                               split its shards with their token counts
  OUT/tokenizer/               the tokenizer itself (bigmodel.data.tokenizers.save)
  OUT/train/train-00000.bin    fixed-size shards of token ids (uint16 when the vocabulary fits,
  OUT/validation/…             else uint32), documents each followed by the end-of-document id

Preparing splits the sources into work units (a text or jsonl file, a parquet row group, a
range of records) tokenized on every core. A finished unit leaves its tokens in OUT/.work/
with a stats file written last, so an interrupted prepare resumes without redoing it; the
shards are then cut from the units in order, each written under a temporary name and renamed,
and the manifest last. A reader opens only a store with a manifest and checks every shard's
size against it.

Validation split (SPLIT_RULE): a document is held out when the first 8 hex digits of the
SHA-1 of its UTF-8 text, as an integer, modulo 10,000 fall below validation_fraction × 10,000.
The same corpus always gives the same split, whatever the file order or process count.

Reading: example i of a split is the window tokens[i·L : i·L + L + 1] (L = seq_len), so every
token is a target once. The windows are shuffled by grain with the run's seed and repeated;
global step s holds examples s·B … s·B + B − 1 of that order and each process reads only its
rows of them, so the data order is the same for any number of processes and the iterator state
(the next step) resumes on any topology.
"""

from __future__ import annotations

import dataclasses
import glob as glob_lib
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Self

import grain
import numpy as np
from etils import epath

from bigmodel.config import ConfigError
from bigmodel.data import tokenizers

MANIFEST = "manifest.json"
FORMAT = "bigmodel-token-store"
VERSION = 1
SPLITS = ("train", "validation")
WORK_DIR = ".work"
FORMATS = ("jsonl", "parquet", "text", "tfds", "hf-disk")
SPLIT_RULE = ("validation when int(sha1(utf8 text).hexdigest()[:8], 16) % 10000 < validation_fraction * 10000")
RECORDS_PER_UNIT = 20_000  # tfds: records per work unit
ENCODE_BATCH = 256  # documents tokenized per call


class StoreError(ConfigError):
    """A source or store that cannot be used; the message names the file and the fix."""


# --------------------------------------------------------------------------- tokenizers


def tokenizer_from_spec(spec: str, texts: Callable[[], Iterator[str]] | None = None,
                        train_dir: epath.Path | None = None) -> tokenizers.Tokenizer:
    """'byte', 'spm:PATH.model', 'hf:PATH' (tokenizer.json or its folder), or one trained on the corpus:
    'sentencepiece[:VOCAB]' or 'bpe[:VOCAB]' (GPT-2-style byte-level BPE); a bare path is read by its suffix."""
    kind, _, arg = spec.partition(":")
    if spec == "byte":
        return tokenizers.ByteTokenizer()
    if kind in ("sentencepiece", "bpe"):
        vocab = int(arg) if arg.isdigit() else (4096 if kind == "sentencepiece" else 32768)
        if texts is None or train_dir is None:
            raise StoreError(f"--tokenizer {spec!r} trains on the corpus and is only available to `bigmodel prepare`")
        path = train_dir / ("trained.model" if kind == "sentencepiece" else "trained_tokenizer.json")
        if path.exists():
            return tokenizers.SentencePieceTokenizer(path) if kind == "sentencepiece" else tokenizers.HFTokenizer(path)
        if kind == "sentencepiece":
            return tokenizers.train_sentencepiece(texts(), vocab, path)
        return tokenizers.train_bpe(texts(), vocab, path)
    if kind not in ("spm", "hf"):
        kind, arg = ("spm", spec) if spec.endswith(".model") else ("hf", spec)
    if not os.path.exists(arg):
        raise StoreError(f"tokenizer {spec!r}: {arg} does not exist; give 'byte', 'spm:FILE.model', "
                         "'hf:tokenizer.json' (or its folder), 'sentencepiece:VOCAB' or 'bpe:VOCAB'")
    return tokenizers.SentencePieceTokenizer(arg) if kind == "spm" else tokenizers.HFTokenizer(arg)


def tokenizer_identity(tok: tokenizers.Tokenizer) -> dict[str, Any]:
    """What a manifest records about a tokenizer: kind, name, SHA-256 of its file, vocabulary, end id."""
    name = tokenizers.kind(tok)
    info: dict[str, Any] = {"kind": name, "vocab_size": int(tok.vocab_size), "eod_id": int(tok.eod_id)}
    if name == "byte":
        info.update(name="byte", sha256="")
    else:
        info.update(name=os.path.basename(tok.path), sha256=tokenizers.file_sha256(tok.path))
    return info


def describe_tokenizer(info: dict[str, Any]) -> str:
    """'hf tokenizer.json (sha256 1a2b3c4d…)' or 'byte'."""
    return "byte" if info["kind"] == "byte" else f"{info['kind']} {info['name']} (sha256 {info['sha256'][:12]}…)"


def _encode_many(tok: tokenizers.Tokenizer, texts: list[str]) -> list[np.ndarray]:
    if isinstance(tok, tokenizers.HFTokenizer):
        return [np.asarray(e.ids, np.uint32) for e in tok.tok.encode_batch_fast(texts, add_special_tokens=False)]
    if isinstance(tok, tokenizers.SentencePieceTokenizer):
        return [np.asarray(ids, np.uint32) for ids in tok.sp.encode(texts)]
    return [tok.encode(t) for t in texts]


# --------------------------------------------------------------------------- sources


def split_bucket(text: str) -> int:
    """The document's bucket in [0, 10000) under SPLIT_RULE."""
    return int(hashlib.sha1(text.encode("utf-8", errors="surrogatepass")).hexdigest()[:8], 16) % 10_000


def list_files(source: str) -> list[str]:
    """Files of a directory (recursively), a glob, or one file, sorted; through epath for buckets."""
    wildcard = any(c in source for c in "*?[")
    if "://" not in source:
        matches = glob_lib.glob(source if wildcard else os.path.join(source, "**", "*"), recursive=True) \
            if wildcard or os.path.isdir(source) else [source] if os.path.exists(source) else []
        return sorted(p for p in matches if os.path.isfile(p) and not os.path.basename(p).startswith("."))
    if wildcard:
        base = epath.Path(source.partition("*")[0].rsplit("/", 1)[0])
        return sorted(str(p) for p in base.glob(source[len(str(base)) + 1:]) if p.is_file())
    path = epath.Path(source)
    if not path.is_dir():
        return [source] if path.exists() else []
    files, folders = [], [path]
    while folders:
        for p in folders.pop().iterdir():
            (folders if p.is_dir() else files).append(p)
    return sorted(str(p) for p in files if not p.name.startswith("."))


def _open_binary(path: str) -> io.BufferedIOBase:
    raw = epath.Path(path).open("rb")
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if path.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return raw


def _zstd_error() -> type[Exception]:
    try:
        import zstandard

        return zstandard.ZstdError
    except ImportError:
        return OSError


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of a possibly compressed file; a damaged file is a StoreError naming it."""
    line_no = 0
    try:
        with _open_binary(path) as f:
            for line_no, line in enumerate(f, 1):
                yield line_no, line
    except (OSError, EOFError, ValueError, _zstd_error()) as e:
        raise StoreError(f"{path} cannot be read after line {line_no} ({e}); the file is damaged or truncated: "
                         "fetch it again") from None


def _jsonl_records(path: str, text_key: str) -> Iterator[str]:
    for line_no, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path} line {line_no}"
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreError(f"{where} is not JSON ({e}); fix or remove that line") from None
        if not isinstance(record, dict) or text_key not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise StoreError(f"{where} has no text field {text_key!r} (it has {keys}); pass --text-key KEY")
        yield record[text_key]


def _as_text(data: bytes) -> str:
    """UTF-8 bytes as text; bytes that are not UTF-8 become lone surrogates (Python's surrogateescape), which
    the byte tokenizer turns back into exactly those bytes and every other tokenizer refuses (_check_utf8)."""
    return data.decode("utf-8", errors="surrogateescape")


def _check_utf8(where: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        offset = len(text[:e.start].encode("utf-8", errors="surrogateescape"))
        raise StoreError(f"{where} is not UTF-8 text (byte {offset}); only --tokenizer byte keeps bytes that are "
                         "not UTF-8: convert it to UTF-8 (e.g. iconv -t utf-8) or leave it out of --source") from None


def _record_name(opts: Any, unit: Unit, k: int) -> str:
    """Where record k of a unit comes from, for messages: the text file, or the TFDS record's index."""
    return unit.path if opts.format == "text" else f"{unit.path} record {max(unit.part, 0) + k}"


def _text_records(path: str) -> Iterator[str]:
    yield _as_text(epath.Path(path).read_bytes())


def _parquet_file(path: str) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(epath.Path(path).open("rb"))
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError … for a bad file
        raise StoreError(f"{path} is not a readable parquet file ({e}); fetch it again or leave it out") from None


def _parquet_records(path: str, row_group: int, text_key: str) -> Iterator[str]:
    pf = _parquet_file(path)
    if text_key not in pf.schema_arrow.names:
        raise StoreError(f"{path} has no column {text_key!r} (columns: {pf.schema_arrow.names}); "
                         "pass --text-key COLUMN")
    try:
        column = pf.read_row_group(row_group, columns=[text_key]).column(0)
    except Exception as e:  # noqa: BLE001
        raise StoreError(f"{path} row group {row_group} cannot be read ({e}); the file is damaged: fetch "
                         "it again") from None
    for text in column.to_pylist():
        if text is not None:
            yield text


def _hf_disk_files(source: str) -> list[str]:
    state = epath.Path(source) / "state.json"
    if not state.exists():
        raise StoreError(f"{source} holds no state.json: not a dataset saved with datasets' save_to_disk; pass "
                         "the folder save_to_disk wrote (one split)")
    return [str(epath.Path(source) / f["filename"]) for f in json.loads(state.read_text())["_data_files"]]


def _hf_disk_records(path: str, text_key: str) -> Iterator[str]:
    import pyarrow as pa

    try:
        reader = pa.ipc.open_stream(epath.Path(path).open("rb"))
    except Exception as e:  # noqa: BLE001
        raise StoreError(f"{path} is not an Arrow stream ({e}); save the dataset again with save_to_disk") from None
    if text_key not in reader.schema.names:
        raise StoreError(f"{path} has no column {text_key!r} (columns: {reader.schema.names}); pass --text-key")
    for batch in reader:
        for text in batch.column(text_key).to_pylist():
            if text is not None:
                yield text


def _tfds_records(name: str, data_dir: str, split: str, start: int, stop: int,
                  text_key: str) -> Iterator[str]:
    import tensorflow_datasets as tfds

    from bigmodel.data import text_files  # noqa: F401 - registers our builder, so 'text_files/…' opens too

    ds = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    for i in range(start, stop):
        text = ds[i][text_key]
        yield _as_text(text) if isinstance(text, bytes) else text


@dataclasses.dataclass(frozen=True)
class Unit:
    """One piece of work: a file, a parquet row group, or a range of TFDS records."""

    path: str
    part: int = -1  # parquet row group; tfds: start record
    stop: int = -1  # tfds: end record


def plan_units(fmt: str, source: str, data_dir: str = "", split: str = "train") -> list[Unit]:
    """The work units of a source, in the order their tokens are stored."""
    if fmt == "tfds":
        import tensorflow_datasets as tfds

        if source == "text_files":  # this Python's standard-library sources through our builder, built once
            from bigmodel.data import text_files

            source = f"text_files/{text_files.prepare('', data_dir).builder_config.name}"
        try:
            n = len(tfds.data_source(source, split=split, data_dir=data_dir or None, download=False))
        except Exception as e:  # noqa: BLE001 - tfds raises several types for an unprepared set
            raise StoreError(f"TFDS dataset {source!r} split {split!r} cannot be opened ({e}); prepare it with "
                             f"`tfds build {source} --file_format array_record`") from None
        return [Unit(source, s, min(s + RECORDS_PER_UNIT, n)) for s in range(0, n, RECORDS_PER_UNIT)]
    files = _hf_disk_files(source) if fmt == "hf-disk" else list_files(source)
    if not files:
        raise StoreError(f"--source {source!r} matches no files; give a directory, a glob or a file")
    if fmt != "parquet":
        return [Unit(f) for f in files]
    units = []
    for f in files:
        units += [Unit(f, g) for g in range(_parquet_file(f).num_row_groups)]
    return units


def unit_records(fmt: str, unit: Unit, text_key: str, data_dir: str = "",
                 split: str = "train") -> Iterator[str]:
    """The text of each document of a unit."""
    if fmt == "jsonl":
        return _jsonl_records(unit.path, text_key)
    if fmt == "text":
        return _text_records(unit.path)
    if fmt == "parquet":
        return _parquet_records(unit.path, unit.part, text_key)
    if fmt == "hf-disk":
        return _hf_disk_records(unit.path, text_key)
    return _tfds_records(unit.path, data_dir, split, unit.part, unit.stop, text_key)


# --------------------------------------------------------------------------- prepare


@dataclasses.dataclass
class Options:
    """What `bigmodel prepare` was asked to do (recorded in the work folder; a resume must match)."""

    source: str
    format: str
    out: str
    tokenizer: str
    text_key: str = "text"
    validation_fraction: float = 0.01
    shard_tokens: int = 1 << 27
    processes: int = 0  # 0 = every core
    data_dir: str = ""  # tfds
    split: str = "train"  # tfds: the split read


_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_dir: str, opts: Options) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per process: the pool is the parallelism
    _WORKER["tok"] = tokenizers.load(tokenizer_dir)
    _WORKER["opts"] = opts


def _unit_paths(work: epath.Path, index: int) -> dict[str, epath.Path]:
    return {"stats": work / f"unit-{index:06d}.json",
            **{s: work / f"unit-{index:06d}.{s}.bin" for s in SPLITS}}


def _write_atomic(path: epath.Path, data: bytes) -> None:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_bytes(data)
    tmp.replace(path)


def _prepare_unit(args: tuple[int, Unit, str, epath.Path]) -> dict[str, Any]:
    index, unit, dtype, work = args
    cpu_start = time.process_time()
    tok, opts = _WORKER["tok"], _WORKER["opts"]
    paths = _unit_paths(work, index)
    eod = np.asarray([tok.eod_id], np.uint32)
    out = {s: [] for s in SPLITS}
    stats = {s: {"documents": 0, "tokens": 0, "bytes": 0} for s in SPLITS}
    byte_counts = np.zeros(256, np.int64)  # of validation documents: the unigram baseline
    records = unit_records(opts.format, unit, opts.text_key, opts.data_dir, opts.split)
    seen = 0
    while True:
        texts = [t for _, t in zip(range(ENCODE_BATCH), records)]
        if not texts:
            break
        if not all(isinstance(t, str) for t in texts):
            bad = next(t for t in texts if not isinstance(t, str))
            raise StoreError(f"{unit.path}: field {opts.text_key!r} holds {type(bad).__name__}, not text; "
                             "pass the --text-key of a string field")
        if not isinstance(tok, tokenizers.ByteTokenizer):  # the byte tokenizer alone stores surrogate escapes
            for k, text in enumerate(texts):
                _check_utf8(_record_name(opts, unit, seen + k), text)
        seen += len(texts)
        for text, ids in zip(texts, _encode_many(tok, texts)):
            split = "validation" if split_bucket(text) < opts.validation_fraction * 10_000 else "train"
            out[split] += [ids, eod]
            data = text.encode("utf-8", errors="surrogateescape")
            stats[split]["documents"] += 1
            stats[split]["tokens"] += len(ids) + 1
            stats[split]["bytes"] += len(data)
            if split == "validation":
                byte_counts += np.bincount(np.frombuffer(data, np.uint8), minlength=256)
    for s in SPLITS:
        tokens = np.concatenate(out[s]).astype(dtype) if out[s] else np.zeros(0, dtype)
        _write_atomic(paths[s], tokens.tobytes())
    result = {"unit": dataclasses.asdict(unit), "splits": stats, "cpu_s": time.process_time() - cpu_start,
              "validation_byte_counts": byte_counts.tolist()}
    _write_atomic(paths["stats"], json.dumps(result).encode())  # last: marks the unit done
    return result


class _InProcess:
    """The Pool methods prepare uses, run in this process (processes=1: no start-up cost, plain tracebacks)."""

    def __init__(self, tokenizer_dir: str, opts: Options) -> None:
        _init_worker(tokenizer_dir, opts)

    def imap_unordered(self, fn: Callable, items: list, chunksize: int = 1) -> Iterator:
        return map(fn, items)

    def map(self, fn: Callable, items: list) -> list:
        return list(map(fn, items))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        _WORKER.clear()


def _pool(processes: int, tokenizer_dir: str, opts: Options) -> Any:
    if processes == 1:
        return _InProcess(tokenizer_dir, opts)
    # fork is cheap, but not after JAX has started its threads
    ctx = multiprocessing.get_context("spawn" if "jax" in sys.modules else "fork")
    return ctx.Pool(processes, initializer=_init_worker, initargs=(tokenizer_dir, opts))


def _hash_file(path: str) -> dict[str, Any]:
    digest, size = hashlib.sha256(), 0
    with epath.Path(path).open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
    return {"path": path, "bytes": size, "sha256": digest.hexdigest()}


def _corpus_sample(opts: Options, units: list[Unit], max_chars: int = 20_000_000) -> Callable[[], Iterator[str]]:
    def texts() -> Iterator[str]:
        seen = 0
        for unit in units:
            for k, text in enumerate(unit_records(opts.format, unit, opts.text_key, opts.data_dir, opts.split)):
                if split_bucket(text) >= opts.validation_fraction * 10_000:
                    _check_utf8(_record_name(opts, unit, k), text)
                    yield text
                    seen += len(text)
                    if seen >= max_chars:
                        return

    return texts


def prepare(opts: Options, progress: bool = True) -> dict[str, Any]:
    """Tokenize `opts.source` into a token store at `opts.out`; returns the manifest (see the module docstring)."""
    if opts.format not in FORMATS:
        raise StoreError(f"--format {opts.format!r} is not one of {', '.join(FORMATS)}")
    if not 0 <= opts.validation_fraction < 1:
        raise StoreError(f"--validation-fraction {opts.validation_fraction} is not in [0, 1); e.g. 0.01")
    if opts.shard_tokens < 1:
        raise StoreError("--shard-tokens must be at least 1; e.g. 134217728")
    out = epath.Path(opts.out)
    if (out / MANIFEST).exists():
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest.get("options") == _comparable(opts):
            print(f"{out} is already a prepared store ({manifest['tokens']:,} tokens); nothing to do", flush=True)
            return manifest
        raise StoreError(f"{out} already holds a store prepared with other options; pass another --out or "
                         "delete it first")
    units = plan_units(opts.format, opts.source, opts.data_dir, opts.split)  # a bad source fails before any write
    work = out / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    plan_file = work / "options.json"
    if plan_file.exists() and json.loads(plan_file.read_text()) != _comparable(opts):
        raise StoreError(f"{out} holds an unfinished prepare with other options ({plan_file}); rerun that "
                         "command to finish it, or pass another --out")
    _write_atomic(plan_file, json.dumps(_comparable(opts), indent=2).encode())

    tok = tokenizer_from_spec(opts.tokenizer, _corpus_sample(opts, units), work)
    prior = tokenizers.load(work) if (work / tokenizers.RUN_DIR).exists() else None
    if prior is not None and tokenizer_identity(prior) != tokenizer_identity(tok):
        raise StoreError(f"{out}'s unfinished units were tokenized with {describe_tokenizer(tokenizer_identity(prior))}"
                         f", not {describe_tokenizer(tokenizer_identity(tok))} (the file changed); restore it, or "
                         f"delete {work} to start over")
    tokenizers.save(tok, work)
    dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
    processes = opts.processes or os.cpu_count() or 1

    todo = [(i, u, dtype, work) for i, u in enumerate(units) if not _unit_paths(work, i)["stats"].exists()]
    done = [json.loads(_unit_paths(work, i)["stats"].read_text()) for i, _ in enumerate(units)
            if _unit_paths(work, i)["stats"].exists()]
    if done:
        print(f"resuming: {len(done)} of {len(units)} units already tokenized", flush=True)
    results = {}
    import tqdm

    start = time.time()
    bar = tqdm.tqdm(total=len(todo), unit="unit", disable=not progress, dynamic_ncols=True, mininterval=1.0)
    source_bytes = tokens = cpu_s = 0
    with _pool(processes, str(work), opts) as pool:
        for r in pool.imap_unordered(_prepare_unit, todo, chunksize=1):
            results[(r["unit"]["path"], r["unit"]["part"])] = r
            source_bytes += sum(s["bytes"] for s in r["splits"].values())
            tokens += sum(s["tokens"] for s in r["splits"].values())
            cpu_s += r["cpu_s"]
            seconds = max(time.time() - start, 1e-9)
            bar.set_postfix_str(f"{source_bytes / seconds / 1e6:.1f} MB/s, {tokens / seconds / 1e6:.2f} M tokens/s")
            bar.update(1)
        sources = pool.map(_hash_file, sorted({u.path for u in units})) if opts.format != "tfds" else []
    bar.close()
    elapsed = time.time() - start
    for r in done:
        results[(r["unit"]["path"], r["unit"]["part"])] = r
    ordered = [results[(u.path, u.part)] for u in units]

    manifest = _assemble(out, work, ordered, dtype, opts)
    manifest.update(tokenizer=tokenizer_identity(tok), sources=sources,
                    options=_comparable(opts), split_rule={"rule": SPLIT_RULE,
                                                           "validation_fraction": opts.validation_fraction})
    tokenizers.save(tok, out)
    _write_atomic(out / MANIFEST, json.dumps(manifest, indent=2).encode())
    work.rmtree()
    if todo:
        mb = source_bytes / 1e6
        print(f"prepared {out}: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens; "
              f"{mb / elapsed:.1f} MB/s of text with {processes} processes", flush=True)
    manifest.update(prepare_s=elapsed, processes=processes)
    if todo:
        manifest["text_mb_per_s"] = source_bytes / 1e6 / max(elapsed, 1e-9)
        manifest["text_mb_per_cpu_s"] = source_bytes / 1e6 / max(cpu_s, 1e-9)  # per core, however loaded
    return manifest


def _comparable(opts: Options) -> dict[str, Any]:
    d = dataclasses.asdict(opts)
    d.pop("processes")
    d.pop("out")
    return d


def _cut_shards(split: str, folder: epath.Path, pieces: Iterator[np.ndarray], shard_tokens: int) -> list[dict]:
    """Write the concatenation of `pieces` as shards of `shard_tokens` (the last shorter), each atomically."""
    shards: list[dict] = []
    pending: list[np.ndarray] = []
    pending_n = 0

    def write(data: np.ndarray) -> None:
        name = f"{split}-{len(shards):05d}.bin"
        _write_atomic(folder / name, data.tobytes())
        shards.append({"file": f"{split}/{name}", "tokens": len(data)})

    for piece in pieces:
        pending.append(piece)
        pending_n += len(piece)
        if pending_n >= shard_tokens:
            data = np.concatenate(pending)
            whole = len(data) // shard_tokens * shard_tokens
            for start in range(0, whole, shard_tokens):
                write(data[start:start + shard_tokens])
            pending, pending_n = [data[whole:]], len(data) - whole
    if pending_n:
        write(np.concatenate(pending))
    return shards


def _assemble(out: epath.Path, work: epath.Path, units: list[dict], dtype: str, opts: Options) -> dict[str, Any]:
    """Cut each split's unit token files, in unit order, into shards of opts.shard_tokens (the last shorter)."""
    if not sum(u["splits"][s]["documents"] for u in units for s in SPLITS):
        raise StoreError(f"--source {opts.source!r} holds no documents (empty files?); check --source, --format "
                         "and --text-key")
    manifest: dict[str, Any] = {"format": FORMAT, "version": VERSION, "dtype": dtype,
                                "shard_tokens": opts.shard_tokens, "splits": {}}

    def pieces(split: str) -> Iterator[np.ndarray]:
        for i in range(len(units)):
            path = _unit_paths(work, i)[split]
            data = path.read_bytes()
            if len(data) % np.dtype(dtype).itemsize or len(data) // np.dtype(dtype).itemsize != \
                    units[i]["splits"][split]["tokens"]:
                raise StoreError(f"{path} does not hold the tokens its stats file counts; delete {work} and "
                                 "prepare again")
            yield np.frombuffer(data, dtype)

    for split in SPLITS:
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        shards = _cut_shards(split, folder, pieces(split), opts.shard_tokens)
        totals = {k: sum(u["splits"][split][k] for u in units) for k in ("documents", "tokens", "bytes")}
        manifest["splits"][split] = {**totals, "shards": shards}
        if split == "validation":
            counts = np.sum([u["validation_byte_counts"] for u in units], axis=0)
            manifest["splits"][split]["byte_counts"] = [int(c) for c in counts]
    for key in ("documents", "tokens", "bytes"):
        manifest[key] = sum(manifest["splits"][s][key] for s in SPLITS)
    return manifest


# --------------------------------------------------------------------------- reading


class Store:
    """A prepared store opened for reading: its manifest checked against its shards."""

    def __init__(self, path: str) -> None:
        self.path = epath.Path(path)
        manifest = self.path / MANIFEST
        if not manifest.exists():
            hint = " (an unfinished prepare: rerun it)" if (self.path / WORK_DIR).exists() else ""
            raise StoreError(f"{path} is not a prepared token store: no {MANIFEST}{hint}; make one with "
                             "`bigmodel prepare --source … --out DIR`")
        try:
            self.manifest = json.loads(manifest.read_text())
        except json.JSONDecodeError as e:
            raise StoreError(f"{manifest} is not valid JSON ({e}); prepare the store again") from None
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise StoreError(f"{manifest} is not a {FORMAT} version {VERSION} manifest; prepare the store again")
        self.dtype = np.dtype(self.manifest["dtype"])
        self.tokenizer_info = self.manifest["tokenizer"]

    def tokenizer(self) -> tokenizers.Tokenizer:
        """The tokenizer the store was prepared with (from STORE/tokenizer/)."""
        tok = tokenizers.load(self.path)
        if tok is None:
            raise StoreError(f"{self.path / tokenizers.RUN_DIR} is missing; prepare the store again")
        return tok

    def split(self, name: str) -> Tokens:
        """The token ids of split `name` ('train' or 'validation')."""
        if name not in self.manifest["splits"]:
            raise StoreError(f"{self.path} has no split {name!r}; it has {sorted(self.manifest['splits'])}")
        return Tokens(self.path, self.manifest["splits"][name]["shards"], self.dtype)

    def unigram_bits_per_byte(self) -> float:
        """Entropy of the validation split's byte distribution: what a unigram byte model scores."""
        counts = np.asarray(self.manifest["splits"]["validation"]["byte_counts"], np.float64)
        p = counts[counts > 0] / max(counts.sum(), 1)
        return float(-(p * np.log2(p)).sum())


class Tokens:
    """A split's shards as one array of token ids (memory-mapped where local), sizes checked on opening."""

    def __init__(self, root: epath.Path, shards: list[dict], dtype: np.dtype) -> None:
        self.dtype = dtype
        self.arrays: list[Any] = []
        for shard in shards:
            path = root / shard["file"]
            want = shard["tokens"] * dtype.itemsize
            have = path.stat().length if path.exists() else None
            if have != want:
                state = "is missing" if have is None else f"has {have:,} bytes"
                raise StoreError(f"shard {path} {state} but {root / MANIFEST} says {want:,} (truncated or "
                                 "replaced); prepare the store again")
            if "://" in str(path):
                self.arrays.append(_RemoteShard(path, shard["tokens"], dtype))
            elif shard["tokens"]:
                self.arrays.append(np.memmap(path, dtype=dtype, mode="r"))
        self.arrays = [a for a in self.arrays if len(a)]
        self.ends = np.cumsum([len(a) for a in self.arrays])
        self.size = int(self.ends[-1]) if len(self.ends) else 0

    def __len__(self) -> int:
        return self.size

    def read_many(self, starts: np.ndarray, length: int) -> np.ndarray:
        """[len(starts), length] int32; rows inside one shard are gathered at once, those crossing shards one by one."""
        shard = np.searchsorted(self.ends, starts, side="right")
        base = np.concatenate([[0], self.ends])[shard]
        inside = starts + length <= self.ends[np.minimum(shard, len(self.ends) - 1)]
        out = np.empty((len(starts), length), np.int32)
        offsets = np.arange(length)
        for k in np.unique(shard[inside]):
            rows = np.flatnonzero(inside & (shard == k))
            local = (starts[rows] - base[rows])[:, None] + offsets
            out[rows] = self.arrays[k][local] if isinstance(self.arrays[k], np.ndarray) else np.stack(
                [self.arrays[k][slice(int(a), int(a) + length)] for a in local[:, 0]])
        for r in np.flatnonzero(~inside):
            out[r] = self.read(int(starts[r]), length)
        return out

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int32."""
        if length <= 0:
            return np.zeros(0, np.int32)
        out, i = [], int(np.searchsorted(self.ends, start, side="right"))
        while length > 0:
            base = int(self.ends[i - 1]) if i else 0
            piece = self.arrays[i][start - base: start - base + length]
            out.append(piece)
            start, length, i = start + len(piece), length - len(piece), i + 1
        return (out[0] if len(out) == 1 else np.concatenate(out)).astype(np.int32)


class _RemoteShard:
    """A shard in object storage read by ranges (memory mapping needs a local file)."""

    def __init__(self, path: epath.Path, tokens: int, dtype: np.dtype) -> None:
        self.path, self.tokens, self.dtype = path, tokens, dtype
        self.file = None

    def __len__(self) -> int:
        return self.tokens

    def __getitem__(self, s: slice) -> np.ndarray:
        start, stop = max(s.start, 0), min(s.stop, self.tokens)
        if self.file is None:
            self.file = self.path.open("rb")
        self.file.seek(start * self.dtype.itemsize)
        return np.frombuffer(self.file.read((stop - start) * self.dtype.itemsize), self.dtype)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A seeded pseudo-random permutation of [0, n), evaluated for any batch of indices in O(1) memory.

    A 4-round Feistel network on the smallest even number of bits that covers n, walked until the
    value falls inside [0, n) (a bijection on that range). Epoch e of a repeated dataset uses the
    key of (seed, e), so every pass is shuffled anew; grain's per-index shuffle costs about 100×
    more per example, which a 64 × 1024 batch cannot afford.
    """

    ROUNDS = 4

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self.half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.half) - 1)

    def _keys(self, epoch: np.ndarray) -> list[np.ndarray]:
        seed = np.uint64((self.seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
        base = _mix64(seed + epoch.astype(np.uint64))
        return [_mix64(base + np.uint64(r + 1)) for r in range(self.ROUNDS)]

    def _round_trip(self, x: np.ndarray, keys: list[np.ndarray]) -> np.ndarray:
        left, right = x >> np.uint64(self.half), x & self.mask
        for key in keys:
            left, right = right, left ^ (_mix64(right ^ key) & self.mask)
        return (left << np.uint64(self.half)) | right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        """Permuted positions of `index` (int64, any values >= 0; index // n is the epoch)."""
        index = np.asarray(index, np.int64)
        epoch, x = np.divmod(index, self.n)
        keys = self._keys(epoch)
        x = x.astype(np.uint64)
        todo = np.ones(x.shape, bool)
        while todo.any():
            x = np.where(todo, self._round_trip(x, keys), x)
            todo = x >= np.uint64(self.n)
        return x.astype(np.int64)


class Windows:
    """Example i of a split: tokens [i·seq_len, i·seq_len + seq_len + 1), shuffled per epoch (seed None: in order)."""

    def __init__(self, tokens: Tokens, seq_len: int, seed: int | None) -> None:
        self.tokens, self.seq_len = tokens, seq_len
        self.n = max((len(tokens) - 1) // seq_len, 0)
        self.order = Permutation(self.n, seed) if seed is not None and self.n else None

    def __len__(self) -> int:
        return self.n

    def read(self, index: np.ndarray) -> np.ndarray:
        """[len(index), seq_len + 1] int32 windows of examples `index` (index >= len: later epochs)."""
        index = np.asarray(index, np.int64)
        ids = self.order(index) if self.order is not None else index % self.n
        return self.tokens.read_many(ids * self.seq_len, self.seq_len + 1)


class Mixture:
    """Deterministic weighted interleaving: each block of BLOCK examples holds round(w_k × BLOCK) of source k,
    spread evenly, so source k's position after any example is known without counting."""

    BLOCK = 4096

    def __init__(self, weights: Sequence[float]) -> None:
        p = np.asarray(weights, np.float64) / np.sum(weights)
        counts = np.floor(p * self.BLOCK).astype(np.int64)
        counts[np.argsort(-(p * self.BLOCK - counts))[: self.BLOCK - counts.sum()]] += 1  # largest remainders
        self.counts = counts
        # Position j of source k sits at (j + 0.5) / count_k of the block; sorting interleaves them.
        keys = np.concatenate([(np.arange(c) + 0.5) / c for c in counts if c])
        sources = np.concatenate([np.full(c, k) for k, c in enumerate(counts) if c])
        order = np.argsort(keys, kind="stable")
        self.source = sources[order]
        self.rank = np.concatenate([np.arange(c) for c in counts if c])[order]

    def __call__(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, index within that source) of mixture examples `index`."""
        block, r = np.divmod(np.asarray(index, np.int64), self.BLOCK)
        source = self.source[r]
        return source, block * self.counts[source] + self.rank[r]


class StepBatches(Sequence):
    """Element s: this process's rows of global batch s (examples s·B + lo … s·B + hi − 1 of the mixture)."""

    def __init__(self, sources: list[Windows], weights: Sequence[float], batch_size: int, shard: tuple[int, int],
                 token_bytes: np.ndarray, steps: int) -> None:
        index, count = shard
        if batch_size % count:
            raise ValueError(f"global batch {batch_size} is not divisible by the {count} processes")
        self.sources, self.batch_size, self.steps = sources, batch_size, steps
        self.mixture = Mixture(weights) if len(sources) > 1 else None
        self.rows = np.arange(index * batch_size // count, (index + 1) * batch_size // count)
        self.token_bytes = token_bytes.astype(np.float32)

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        examples = int(step) * self.batch_size + self.rows
        if self.mixture is None:
            windows = self.sources[0].read(examples)
        else:
            source, within = self.mixture(examples)
            windows = np.empty((len(examples), self.sources[0].seq_len + 1), np.int32)
            for k in np.unique(source):
                windows[source == k] = self.sources[k].read(within[source == k])
        targets = windows[:, 1:]
        return {"inputs": windows[:, :-1], "targets": targets, "weights": np.ones(targets.shape, np.float32),
                "target_bytes": self.token_bytes[targets]}


def check_tokenizer(store: Store, spec: str) -> tokenizers.Tokenizer:
    """The tokenizer to train with: the store's, after checking it is the one config.data.tokenizer names."""
    tok = store.tokenizer()
    if spec == "store":
        return tok
    wanted = tokenizer_identity(tokenizer_from_spec(spec))
    have = store.tokenizer_info
    if (wanted["kind"], wanted["sha256"]) != (have["kind"], have["sha256"]):
        raise StoreError(
            f"store {store.path} was prepared with tokenizer {describe_tokenizer(have)} but "
            f"config.data.tokenizer={spec!r} is {describe_tokenizer(wanted)}; set config.data.tokenizer='store' "
            "(or the store's tokenizer file), or prepare the store with this tokenizer")
    return tok


def batches(sources: list[Windows], weights: Sequence[float], batch_size: int, shard: tuple[int, int],
            token_bytes: np.ndarray, *, repeat: bool, prefetch: int = 0) -> grain.IterDataset:
    """This process's rows of consecutive global batches; the iterator's state is the next step's number.

    repeat=False makes one pass over a single source (evaluation).
    """
    steps = sys.maxsize if repeat else len(sources[0]) // batch_size
    ds = grain.MapDataset.source(StepBatches(sources, weights, batch_size, shard, token_bytes, steps))
    options = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=max(prefetch, 1))
    return ds.to_iter_dataset(options)


# --------------------------------------------------------------------------- the 'lm' task's data

EVAL_SEED = 20_231_123  # evaluation windows in one fixed shuffled order, the same for every run seed


def _eval_batches(windows: Windows, batch_size: int, shard: tuple[int, int], token_bytes: np.ndarray,
                  num_batches: int) -> Callable[[], Iterator[dict]]:
    def one_pass() -> Iterator[dict]:
        for i, batch in enumerate(batches([windows], [1.0], batch_size, shard, token_bytes, repeat=False)):
            if num_batches and i >= num_batches:
                return
            yield batch

    return one_pass


def _held_out(store: Store, config: Any, token_bytes: np.ndarray, shard: tuple[int, int]) -> Callable:
    windows = Windows(store.split("validation"), config.data.seq_len, EVAL_SEED)
    if len(windows) < config.eval.batch_size:
        raise StoreError(f"the validation split of {store.path} holds {len(windows)} sequences of "
                         f"config.data.seq_len={config.data.seq_len}, fewer than config.eval.batch_size="
                         f"{config.eval.batch_size}; prepare it with a larger --validation-fraction or lower the batch")
    return _eval_batches(windows, config.eval.batch_size, shard, token_bytes, config.eval.num_batches)


def same_tokenizer(store: Store, tok: tokenizers.Tokenizer, what: str) -> None:
    have, want = store.tokenizer_info, tokenizer_identity(tok)
    if (have["kind"], have["sha256"]) != (want["kind"], want["sha256"]):
        raise StoreError(f"{what} {store.path} was prepared with tokenizer {describe_tokenizer(have)} but this run "
                         f"uses {describe_tokenizer(want)}; prepare it again with the run's tokenizer")


def set_name(path: str) -> str:
    """The name a store's metrics are reported under: its folder's name."""
    return epath.Path(path.rstrip("/")).name


def eval_sets(config: Any, tok: tokenizers.Tokenizer, shard: tuple[int, int]) -> dict[str, Callable]:
    """config.eval.sets: each store's validation split as a fresh pass of evaluation batches, by set name."""
    sets: dict[str, Callable] = {}
    for path in config.eval.sets:
        name = set_name(path)
        if name in sets:
            raise ConfigError(f"config.eval.sets has two stores named {name!r}; give each set its own folder name")
        s = Store(path)
        same_tokenizer(s, tok, "config.eval.sets store")
        sets[name] = _held_out(s, config, tok.token_bytes, shard)
    return sets


def build(config: Any, shard: tuple[int, int]) -> Any:
    """Data for the 'lm' task from config.data.sources: stores mixed by config.data.weights (bigmodel.data.build).

    Training mixes the stores' train splits; the run's own evaluation reads the first store's
    validation split (name the others in config.eval.sets to see each).
    """
    from bigmodel.data import Data

    cfg = config.data
    weights = [float(w) for w in cfg.weights] or [1.0] * len(cfg.sources)
    if len(weights) != len(cfg.sources) or min(weights) <= 0:
        raise ConfigError(f"config.data.weights={tuple(cfg.weights)} must hold one positive weight per store of "
                          f"config.data.sources ({len(cfg.sources)}), or be () for equal weights")
    stores = [Store(p) for p in cfg.sources]
    tok = check_tokenizer(stores[0], cfg.tokenizer)
    for s in stores[1:]:
        same_tokenizer(s, tok, "config.data.sources store")
    train = []
    for i, s in enumerate(stores):
        windows = Windows(s.split("train"), cfg.seq_len, config.seed * 1_000 + i)
        if not len(windows):
            raise StoreError(f"the train split of {s.path} holds {len(windows.tokens)} tokens, fewer than "
                             f"config.data.seq_len + 1 = {cfg.seq_len + 1}; lower seq_len or prepare more text")
        train.append(windows)
    return Data(
        train=batches(train, weights, config.train.batch_size, shard, tok.token_bytes, repeat=True,
                      prefetch=cfg.prefetch),
        eval_batches=_held_out(stores[0], config, tok.token_bytes, shard),
        units_per_example=cfg.seq_len,
        info={"unigram_bits_per_byte": stores[0].unigram_bits_per_byte(), "dataset": ",".join(cfg.sources)},
        tokenizer=tok,
        eval_sets=eval_sets(config, tok, shard),
    )
