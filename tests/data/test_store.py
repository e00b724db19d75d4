"""Token stores: `bigmodel prepare` from every source format, the split rule, resuming, bad input, and the
reader's per-process rows, topology-independent order, mixtures and tokenizer checks."""

import glob
import gzip
import json
import os
import sysconfig

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bigmodel import cli
from bigmodel.config import ConfigError
from bigmodel.data import store, tokenizers

STDLIB = sysconfig.get_paths()["stdlib"]


def stdlib_docs(n=40, start=0):
    """Real documents: the first n standard-library modules (as UTF-8 text)."""
    files = sorted(glob.glob(os.path.join(STDLIB, "*.py")))[start:start + n]
    return [open(f, encoding="utf-8", errors="replace").read() for f in files]


def write_jsonl(path, docs, key="text", opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({key: d, "id": len(d)}) + "\n")


def write_sources(root, docs):
    """The same documents as jsonl, jsonl.gz, jsonl.zst, parquet (3 row groups), text files and a datasets
    save_to_disk folder (Arrow stream + state.json); returns {format: source}."""
    import zstandard

    root.mkdir(parents=True, exist_ok=True)
    half = len(docs) // 2
    (root / "jsonl").mkdir()
    write_jsonl(root / "jsonl" / "a.jsonl", docs[:half])
    write_jsonl(root / "jsonl" / "b.jsonl.gz", docs[half:], opener=gzip.open)
    zst = root / "zst"
    zst.mkdir()
    with open(zst / "all.jsonl.zst", "wb") as raw, zstandard.ZstdCompressor().stream_writer(raw) as w:
        w.write("".join(json.dumps({"text": d}) + "\n" for d in docs).encode())
    (root / "parquet").mkdir()
    pq.write_table(pa.table({"text": docs}), root / "parquet" / "part.parquet", row_group_size=len(docs) // 3 + 1)
    (root / "text").mkdir()
    for i, d in enumerate(docs):
        (root / "text" / f"{i:03d}.txt").write_text(d, encoding="utf-8")
    hf = root / "hf"
    hf.mkdir()
    table = pa.table({"text": docs})
    with pa.ipc.new_stream(hf / "data-00000-of-00001.arrow", table.schema) as w:
        w.write_table(table, max_chunksize=7)
    (hf / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    return {"jsonl": str(root / "jsonl"), "zst": str(zst / "all.jsonl.zst"), "parquet": str(root / "parquet"),
            "text": str(root / "text"), "hf-disk": str(hf)}


def prepare(source, fmt, out, **kw):
    kw.setdefault("tokenizer", "byte")
    kw.setdefault("processes", 1)
    kw.setdefault("validation_fraction", 0.2)
    kw.setdefault("shard_tokens", 50_000)
    return store.prepare(store.Options(source=str(source), format=fmt, out=str(out), **kw), progress=False)


def all_tokens(path, split):
    tokens = store.Store(str(path)).split(split)
    return tokens.read(0, len(tokens))


def expected_bytes(docs, fraction, split):
    held = [d for d in docs if (store.split_bucket(d) < fraction * 10_000) == (split == "validation")]
    return np.concatenate([np.append(np.frombuffer(d.encode(), np.uint8).astype(np.int32), 256) for d in held] or
                          [np.zeros(0, np.int32)])


@pytest.fixture(scope="module")
def docs():
    return stdlib_docs()


@pytest.fixture(scope="module")
def byte_store(tmp_path_factory, docs):
    root = tmp_path_factory.mktemp("store")
    write_jsonl(root / "docs.jsonl", docs)
    prepare(root / "docs.jsonl", "jsonl", root / "out")
    return root / "out"


def test_every_format_gives_the_same_store(tmp_path, docs):
    sources = write_sources(tmp_path / "src", docs)
    for fmt, source in sources.items():
        out = tmp_path / fmt
        manifest = prepare(source, "jsonl" if fmt == "zst" else fmt, out)
        for split in store.SPLITS:
            np.testing.assert_array_equal(all_tokens(out, split), expected_bytes(docs, 0.2, split), err_msg=fmt)
        assert manifest["documents"] == len(docs)
        assert manifest["bytes"] == sum(len(d.encode()) for d in docs)
        assert manifest["tokens"] == manifest["bytes"] + len(docs)  # bytes + one end-of-document each
        assert not (out / store.WORK_DIR).exists()
    shards = json.loads((tmp_path / "text" / store.MANIFEST).read_text())["splits"]["train"]["shards"]
    assert [s["tokens"] for s in shards[:-1]] == [50_000] * (len(shards) - 1) and 0 < shards[-1]["tokens"] <= 50_000


def test_a_tfds_dataset(tmp_path, docs):
    from bigmodel.data import text_files

    (tmp_path / "src").mkdir()
    for i, d in enumerate(docs[:12]):
        (tmp_path / "src" / f"{i:02d}.txt").write_text(d, encoding="utf-8")
    builder = text_files.prepare(str(tmp_path / "src"), str(tmp_path / "tfds"), 0.25)
    name = f"text_files/{builder.builder_config.name}"
    m = prepare(name, "tfds", tmp_path / "out", data_dir=str(tmp_path / "tfds"), split="train")
    source = builder.as_data_source(split="train")
    texts = [source[i]["text"].decode() for i in range(len(source))]
    assert m["documents"] == len(texts) > 0 and m["sources"] == []
    for split in store.SPLITS:
        np.testing.assert_array_equal(all_tokens(tmp_path / "out", split), expected_bytes(texts, 0.2, split))


def test_manifest_records_sources_tokenizer_and_split_rule(byte_store, docs):
    m = json.loads((byte_store / store.MANIFEST).read_text())
    assert m["dtype"] == "uint16" and m["tokenizer"]["kind"] == "byte" and m["tokenizer"]["eod_id"] == 256
    (source,) = m["sources"]
    assert source["bytes"] == os.path.getsize(source["path"])
    assert source["sha256"] == tokenizers.file_sha256(source["path"])
    assert m["split_rule"]["validation_fraction"] == 0.2 and "sha1" in m["split_rule"]["rule"]
    held = sum(store.split_bucket(d) < 2000 for d in docs)
    assert m["splits"]["validation"]["documents"] == held and 0 < held < len(docs)
    counts = np.sum([np.bincount(np.frombuffer(d.encode(), np.uint8), minlength=256) for d in docs
                     if store.split_bucket(d) < 2000], axis=0)
    assert m["splits"]["validation"]["byte_counts"] == counts.tolist()


def test_hf_tokenizer_and_two_processes(tmp_path, docs):
    tok = tokenizers.train_bpe(docs, 600, tmp_path / "tok" / "tokenizer.json")
    (tmp_path / "src").mkdir()
    write_jsonl(tmp_path / "src" / "a.jsonl", docs[:20])
    write_jsonl(tmp_path / "src" / "b.jsonl", docs[20:])
    one = prepare(tmp_path / "src", "jsonl", tmp_path / "one", tokenizer=f"hf:{tok.path}")
    two = prepare(tmp_path / "src" / "*.jsonl", "jsonl", tmp_path / "two", tokenizer=f"hf:{tok.path}", processes=2)
    assert one["tokenizer"] == two["tokenizer"] and one["tokenizer"]["sha256"] == tokenizers.file_sha256(tok.path)
    train = all_tokens(tmp_path / "two", "train")
    np.testing.assert_array_equal(all_tokens(tmp_path / "one", "train"), train)
    assert train.max() < tok.vocab_size and (train == tok.eod_id).sum() == two["splits"]["train"]["documents"]
    first = train[:np.argmax(train == tok.eod_id)]
    train_docs = [d for d in docs if store.split_bucket(d) >= 2000]
    assert tok.decode(first) == train_docs[0]  # lossless


def test_an_interrupted_prepare_resumes_without_redoing_units(tmp_path, docs, monkeypatch):
    for i in range(4):
        write_jsonl(tmp_path / f"{i}.jsonl", docs[i * 10:(i + 1) * 10])
    done = []
    real = store._prepare_unit

    def count(args):
        done.append(args[0])
        if len(done) == 3:
            raise KeyboardInterrupt  # killed while tokenizing the third unit
        return real(args)

    monkeypatch.setattr(store, "_prepare_unit", count)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "*.jsonl", "jsonl", tmp_path / "out")
    assert not (tmp_path / "out" / store.MANIFEST).exists()
    with pytest.raises(ConfigError, match="not a prepared token store.*unfinished prepare"):
        store.Store(str(tmp_path / "out"))
    done.clear()
    prepare(tmp_path / "*.jsonl", "jsonl", tmp_path / "out")
    assert done == [2, 3]  # the two finished units were not redone
    for split in store.SPLITS:
        np.testing.assert_array_equal(all_tokens(tmp_path / "out", split), expected_bytes(docs, 0.2, split))
    with pytest.raises(ConfigError, match="other options"):
        prepare(tmp_path / "*.jsonl", "jsonl", tmp_path / "out", validation_fraction=0.1)


@pytest.mark.parametrize("case", ["not_json", "no_field", "empty", "bad_parquet", "bad_row_group"])
def test_bad_input_names_the_file_and_keeps_nothing(tmp_path, case):
    src = tmp_path / "src"
    src.mkdir()
    fmt, match = "jsonl", None
    if case == "not_json":
        (src / "a.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
        match = r"a\.jsonl line 2 is not JSON"
    elif case == "no_field":
        (src / "a.jsonl").write_text('{"body": "fine"}\n')
        match = r"a\.jsonl line 1 has no text field 'text' \(it has \['body'\]\); pass --text-key"
    elif case == "empty":
        (src / "a.jsonl").write_text("")
        match = "holds no documents"
    elif case == "bad_parquet":
        fmt = "parquet"
        (src / "a.parquet").write_bytes(b"PAR1 this is not parquet")
        match = r"a\.parquet is not a readable parquet file"
    else:
        fmt = "parquet"
        pq.write_table(pa.table({"text": [f"doc {i} " * 50 for i in range(40)]}), src / "a.parquet",
                       row_group_size=10)
        start = pq.ParquetFile(src / "a.parquet").metadata.row_group(1).column(0).data_page_offset
        data = bytearray((src / "a.parquet").read_bytes())
        data[start:start + 64] = b"\xff" * 64  # the page header of row group 1 (the second of four)
        (src / "a.parquet").write_bytes(bytes(data))
        match = r"a\.parquet row group 1 cannot be read"
    with pytest.raises(ConfigError, match=match):
        prepare(src, fmt, tmp_path / "out")
    assert not (tmp_path / "out" / store.MANIFEST).exists()
    assert cli.main(["prepare", "--source", str(src), "--format", fmt, "--out", str(tmp_path / "out2"),
                     "--processes", "1", "--quiet"]) == 2


def test_bytes_that_are_not_utf8(tmp_path, docs):
    """The byte tokenizer stores a file's bytes exactly, UTF-8 or not; any other tokenizer refuses the file, naming
    it and the byte, and keeps nothing (a tokenizer trained on the corpus too, before it trains)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"caf\xe9\n")
    (src / "b.txt").write_text(docs[0], encoding="utf-8")
    m = prepare(src, "text", tmp_path / "bytes", validation_fraction=0)
    raw = [b"caf\xe9\n", docs[0].encode()]
    np.testing.assert_array_equal(all_tokens(tmp_path / "bytes", "train"),
                                  np.concatenate([np.append(np.frombuffer(r, np.uint8), 256) for r in raw]))
    assert m["bytes"] == sum(map(len, raw)) and m["tokens"] == m["bytes"] + 2
    tok = tokenizers.train_bpe(docs, 300, tmp_path / "tok" / "tokenizer.json")
    for spec, out in ((f"hf:{tok.path}", "hf"), ("bpe:300", "bpe")):
        with pytest.raises(ConfigError, match=r"a\.txt is not UTF-8 text \(byte 3\); only --tokenizer byte .*iconv"):
            prepare(src, "text", tmp_path / out, tokenizer=spec)
        assert not (tmp_path / out / store.MANIFEST).exists()


def test_the_stdlib_through_our_text_files_builder(tmp_path, docs, monkeypatch):
    """--format tfds --source text_files: the standard library's sources (here a stand-in folder with a latin-1
    module, as the real one has), built into TFDS once and stored byte for byte."""
    from bigmodel.data import text_files

    lib = tmp_path / "lib"
    (lib / "site-packages").mkdir(parents=True)
    for i, d in enumerate(docs[:10]):
        (lib / f"m{i}.py").write_text(d, encoding="utf-8")
    (lib / "latin1.py").write_bytes(b"# -*- coding: latin-1 -*-\nname = 'caf\xe9'\n")
    (lib / "site-packages" / "pkg.py").write_text("left out\n")
    held = next(f"held{i}.py" for i in range(1000) if text_files.is_validation(f"held{i}.py", 0.05))
    (lib / held).write_text("# the builder's validation split needs a file\n")
    monkeypatch.setattr(text_files, "stdlib_source", lambda: str(lib / "**" / "*.py"))
    m = prepare("text_files", "tfds", tmp_path / "out", data_dir=str(tmp_path / "tfds"), validation_fraction=0)
    train = text_files.prepare("", str(tmp_path / "tfds")).as_data_source(split="train")
    raw = [train[i]["text"] for i in range(len(train))]
    assert m["documents"] == len(raw) >= 9 and any(b"caf\xe9" in r for r in raw)
    assert not any(b"left out" in r for r in raw)
    np.testing.assert_array_equal(all_tokens(tmp_path / "out", "train"),
                                  np.concatenate([np.append(np.frombuffer(r, np.uint8), 256) for r in raw]))


def test_a_damaged_store_is_refused(tmp_path, byte_store):
    import shutil

    shutil.copytree(byte_store, tmp_path / "s")
    shard = min((tmp_path / "s" / "train").glob("*.bin"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ConfigError, match=rf"shard .*{shard.name} has 99,990 bytes but .*manifest.json says 100,000"):
        store.Store(str(tmp_path / "s")).split("train")
    (tmp_path / "s" / store.MANIFEST).write_text("{")
    with pytest.raises(ConfigError, match="manifest.json is not valid JSON"):
        store.Store(str(tmp_path / "s"))


def test_permutation_is_a_bijection_per_epoch():
    for n in (1, 2, 7, 1000, 4097):
        p = store.Permutation(n, seed=3)
        first, second = p(np.arange(n)), p(np.arange(n, 2 * n))
        assert sorted(first) == list(range(n)) and sorted(second) == list(range(n))
        if n > 7:
            assert not np.array_equal(first, second) and not np.array_equal(first, np.arange(n))
    assert not np.array_equal(store.Permutation(1000, 1)(np.arange(1000)), store.Permutation(1000, 2)(np.arange(1000)))


def test_mixture_keeps_weights_and_each_source_in_order():
    mix = store.Mixture([3.0, 1.0])
    source, within = mix(np.arange(3 * mix.BLOCK))
    assert (source == 0).sum() == 3 * 3072 and (source == 1).sum() == 3 * 1024
    for k in (0, 1):  # each source is read 0, 1, 2, ... with no gap or repeat
        np.testing.assert_array_equal(within[source == k], np.arange((source == k).sum()))
    assert set(source[:8]) == {0, 1}  # interleaved, not in blocks


def lm_config(sources, weights=(), seq_len=32, batch=8, tokenizer="store", sets=()):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(sources=tuple(map(str, sources)), weights=weights, tokenizer=tokenizer,
                                            seq_len=seq_len, prefetch=0))
    c.train = ml_collections.ConfigDict(dict(batch_size=batch))
    c.eval = ml_collections.ConfigDict(dict(batch_size=4, num_batches=0, sets=tuple(map(str, sets))))
    return c


def take(it, n):
    return [next(it) for _ in range(n)]


def test_batches_are_windows_of_the_store(byte_store):
    data = store.build(lm_config([byte_store]), (0, 1))
    tokens = all_tokens(byte_store, "train")
    for batch in take(iter(data.train), 3):
        assert batch["inputs"].shape == (8, 32) and batch["inputs"].dtype == np.int32
        np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
        for row in np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1):
            start = np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(tokens, 33)[::32] == row, axis=1))
            assert len(start) >= 1  # a window at a multiple of seq_len
        np.testing.assert_array_equal(batch["target_bytes"], (batch["targets"] != 256).astype(np.float32))
    evals = list(data.eval_batches())
    assert len(evals) == (len(all_tokens(byte_store, "validation")) - 1) // 32 // 4


@pytest.mark.parametrize("weights", [(), (2.0, 1.0)])
def test_processes_read_only_their_rows_and_resume_on_any_topology(byte_store, tmp_path, docs, weights):
    write_jsonl(tmp_path / "b.jsonl", stdlib_docs(20, start=100))
    prepare(tmp_path / "b.jsonl", "jsonl", tmp_path / "b")
    sources = [byte_store] + ([tmp_path / "b"] if weights else [])
    c = lm_config(sources, weights)
    whole = take(iter(store.build(c, (0, 1)).train), 6)
    for count in (2, 4):
        parts = [take(iter(store.build(c, (i, count)).train), 6) for i in range(count)]
        for step in range(6):
            np.testing.assert_array_equal(np.concatenate([p[step]["inputs"] for p in parts]), whole[step]["inputs"])
    # Two processes stop after 4 steps; one process resumes from their (identical) iterator state.
    it = iter(store.build(c, (1, 2)).train)
    take(it, 4)
    resumed = iter(store.build(c, (0, 1)).train)
    resumed.set_state(it.get_state())
    for step in (4, 5):
        np.testing.assert_array_equal(next(resumed)["inputs"], whole[step]["inputs"])


def test_tokenizer_mismatch_is_refused_naming_both(byte_store, tmp_path, docs):
    tok = tokenizers.train_bpe(docs, 400, tmp_path / "tokenizer.json")
    with pytest.raises(ConfigError, match=r"prepared with tokenizer byte but config.data.tokenizer='hf:.*' is hf "
                                          r"tokenizer.json \(sha256 [0-9a-f]{12}…\)"):
        store.build(lm_config([byte_store], tokenizer=f"hf:{tok.path}"), (0, 1))
    assert store.build(lm_config([byte_store], tokenizer="byte"), (0, 1)).tokenizer.vocab_size == 257
    prepare(tmp_path / "tokenizer.json", "text", tmp_path / "bpe", tokenizer=f"hf:{tok.path}", validation_fraction=0)
    with pytest.raises(ConfigError, match="config.data.sources store .*bpe was prepared with tokenizer hf"):
        store.build(lm_config([byte_store, tmp_path / "bpe"]), (0, 1))
    with pytest.raises(ConfigError, match="config.data.weights=.* one positive weight per store"):
        store.build(lm_config([byte_store], weights=(1.0, 2.0)), (0, 1))


def test_eval_sets_by_name(byte_store):
    data = store.build(lm_config([byte_store], sets=[byte_store]), (0, 1))
    assert list(data.eval_sets) == ["out"]
    a, b = list(data.eval_batches()), list(data.eval_sets["out"]())
    assert len(a) == len(b) > 0 and all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b))


def test_a_resume_with_a_changed_tokenizer_file_is_refused(tmp_path, docs, monkeypatch):
    (tmp_path / "src").mkdir()
    write_jsonl(tmp_path / "src" / "a.jsonl", docs[:10])
    path = tmp_path / "tok" / "tokenizer.json"
    tokenizers.train_bpe(docs, 300, path)
    with monkeypatch.context() as m:
        m.setattr(store, "_assemble", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            prepare(tmp_path / "src", "jsonl", tmp_path / "out", tokenizer=f"hf:{path}")
    tokenizers.train_bpe(docs, 400, path)  # the same name, another vocabulary
    with pytest.raises(ConfigError, match=r"unfinished units were tokenized with hf tokenizer.json \(sha256 .*not hf "
                                          r"tokenizer.json .*delete .*\.work to start over"):
        prepare(tmp_path / "src", "jsonl", tmp_path / "out", tokenizer=f"hf:{path}")
