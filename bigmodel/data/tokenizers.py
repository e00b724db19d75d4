"""Tokenizers: bytes (the default), a SentencePiece BPE trained on the train split, and a
Hugging Face fast tokenizer (tokenizer.json, e.g. one shipped with an imported checkpoint).

A run keeps its tokenizer in `WORKDIR/tokenizer/` (`save`, `load`): `tokenizer.json` (kind,
vocabulary size, end-of-document id, SHA-256 of the model file) and, for SentencePiece and
Hugging Face tokenizers, a copy of the model file, so generation, evaluation and export read
the exact vocabulary the run trained with, without rebuilding its dataset.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import tempfile
from collections.abc import Iterable, Iterator
from typing import Protocol

import numpy as np

from bigmodel import storage


class Tokenizer(Protocol):
    """What the pipelines and `generate` need from a tokenizer."""

    vocab_size: int  # ids are in [0, vocab_size)
    eod_id: int  # appended to every document
    token_bytes: np.ndarray  # [vocab_size] UTF-8 bytes each id stands for (0 for specials)

    def encode(self, text: bytes | str) -> np.ndarray:
        """Text -> int32 ids (no end-of-document token)."""
        ...

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; special ids are dropped."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, end-of-document 256."""

    vocab_size = 257
    eod_id = 256

    def __init__(self) -> None:
        self.token_bytes = np.ones(self.vocab_size, np.int32)
        self.token_bytes[self.eod_id] = 0

    def encode(self, text: bytes | str) -> np.ndarray:
        """Text -> its UTF-8 bytes as int32 ids (lone surrogates from surrogateescape: the bytes they stand for)."""
        data = text.encode("utf-8", errors="surrogateescape") if isinstance(text, str) else text
        return np.frombuffer(data, np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text (invalid UTF-8 is replaced)."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece model; lossless on code (identity normalisation, byte fallback)."""

    def __init__(self, model_path: str | os.PathLike) -> None:
        import sentencepiece as spm

        self.path = str(model_path)
        self.sp = spm.SentencePieceProcessor(model_file=self.path)
        self.vocab_size = int(self.sp.get_piece_size())
        self.eod_id = int(self.sp.eos_id())
        self.token_bytes = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            if self.sp.is_control(i) or self.sp.is_unknown(i):
                continue
            if self.sp.is_byte(i):
                self.token_bytes[i] = 1
            else:
                self.token_bytes[i] = len(self.sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))

    def encode(self, text: bytes | str) -> np.ndarray:
        """Text -> int32 ids."""
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        return np.asarray(self.sp.encode(text), np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text."""
        return self.sp.decode([int(i) for i in ids if int(i) != self.eod_id])


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _uses_byte_level(component: dict | None) -> bool:
    if not component:
        return False
    if component.get("type") == "ByteLevel":
        return True
    parts = component.get("decoders") or component.get("pretokenizers") or []
    return any(_uses_byte_level(p) for p in parts)


class HFTokenizer:
    """A Hugging Face fast tokenizer read from its tokenizer.json (needs the `tokenizers` package).

    The end-of-document id is the first of EOD_TOKENS the vocabulary has ('<|endoftext|>' for
    GPT-2, '[SEP]' for BERT). `token_bytes` is exact for byte-level BPE (GPT-2 style) and the
    UTF-8 length of the token's text otherwise (WordPiece '##' and SentencePiece '▁' markers
    accounted for), so bits per byte are approximate for non-byte-level vocabularies.
    """

    EOD_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|end_of_text|>", "[SEP]")

    def __init__(self, path: str | os.PathLike) -> None:
        try:
            from tokenizers import Tokenizer as _Tokenizer
        except ImportError:
            raise ImportError(
                "config.data.tokenizer='hf:…' needs the tokenizers package (pip install tokenizers)") from None
        path = pathlib.Path(path)
        self.path = str(path / "tokenizer.json" if path.is_dir() else path)
        self.tok = _Tokenizer.from_file(self.path)
        self.vocab_size = int(self.tok.get_vocab_size(with_added_tokens=True))
        eod = next((i for t in self.EOD_TOKENS if (i := self.tok.token_to_id(t)) is not None), None)
        if eod is None:
            raise ValueError(f"{self.path} has none of the end-of-document tokens {self.EOD_TOKENS}")
        self.eod_id = int(eod)
        spec = json.loads(self.tok.to_str())
        specials = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        byte_level = _uses_byte_level(spec.get("decoder")) or _uses_byte_level(spec.get("pre_tokenizer"))
        alphabet = _byte_level_alphabet() if byte_level else {}
        prefix = (spec.get("model") or {}).get("continuing_subword_prefix") or ""
        self.token_bytes = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            token = self.tok.id_to_token(i)
            if token is None or i in specials:
                continue
            if byte_level and all(c in alphabet for c in token):
                self.token_bytes[i] = len(token)  # one character per byte
            else:
                if prefix and token.startswith(prefix):
                    token = token[len(prefix):]
                self.token_bytes[i] = len(token.replace("\u2581", " ").encode("utf-8"))

    def token_id(self, token: str) -> int | None:
        """The id of a token of the vocabulary (e.g. '[MASK]'), None if it has none."""
        found = self.tok.token_to_id(token)
        return None if found is None else int(found)

    def encode(self, text: bytes | str) -> np.ndarray:
        """Text -> int32 ids (no special tokens added)."""
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; special ids are dropped."""
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _lines(texts: Iterable[bytes | str], max_chars: int) -> Iterator[str]:
    seen = 0
    for text in texts:
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        for line in text.split("\n"):
            if line.strip():
                yield line
                seen += len(line)
                if seen >= max_chars:
                    return


def train_sentencepiece(
    texts: Iterable[bytes | str], vocab_size: int, out_path: str | os.PathLike, max_chars: int = 20_000_000
) -> SentencePieceTokenizer:
    """Train a BPE SentencePiece model on the given documents and save it atomically."""
    import sentencepiece as spm

    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(texts, max_chars),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,  # keeps token bytes summing to the text's bytes
        split_digits=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n", "    "],
        pad_id=-1,
        minloglevel=2,
    )
    with tempfile.NamedTemporaryFile(dir=out_path.parent, delete=False) as tmp:
        tmp.write(model.getvalue())
    os.replace(tmp.name, out_path)
    return SentencePieceTokenizer(out_path)


def train_bpe(texts: Iterable[bytes | str], vocab_size: int, out_path: str | os.PathLike,
              max_chars: int = 20_000_000) -> HFTokenizer:
    """Train a GPT-2-style byte-level BPE (end-of-document '<|endoftext|>') and save its tokenizer.json atomically."""
    from tokenizers import Tokenizer as _Tokenizer, decoders, models, pre_tokenizers, trainers

    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tok = _Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_lines(texts, max_chars), trainer=trainer)
    with tempfile.NamedTemporaryFile("w", dir=out_path.parent, delete=False) as tmp:
        tmp.write(tok.to_str())
    os.replace(tmp.name, out_path)
    return HFTokenizer(out_path)


def spm_path(data_dir: str | os.PathLike, dataset_id: str, vocab_size: int) -> pathlib.Path:
    """Where the SentencePiece model for a dataset and vocabulary size is cached."""
    digest = hashlib.sha1(dataset_id.encode()).hexdigest()[:12]
    return pathlib.Path(data_dir) / "bigmodel_spm" / f"{digest}_v{vocab_size}.model"


RUN_DIR = "tokenizer"  # WORKDIR/tokenizer/: the run's tokenizer (see `save`)
INFO_FILE = "bigmodel_tokenizer.json"
MODEL_FILES = {"sentencepiece": "tokenizer.model", "hf": "tokenizer.json"}


def kind(tokenizer: Tokenizer) -> str | None:
    """'byte', 'sentencepiece' or 'hf'; None for a task's own vocabulary (e.g. the digit tasks' characters)."""
    for name, cls in (("byte", ByteTokenizer), ("sentencepiece", SentencePieceTokenizer), ("hf", HFTokenizer)):
        if isinstance(tokenizer, cls):
            return name
    return None


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def save(tokenizer: Tokenizer, directory: str | os.PathLike) -> pathlib.Path | None:
    """Write `tokenizer` to DIRECTORY/tokenizer/ (model file first, the info file last, each atomically).

    Returns the folder, or None for a tokenizer of a kind this module does not know (nothing written).
    """
    name = kind(tokenizer)
    if name is None:
        return None
    if storage.is_remote(directory):  # written locally, then uploaded file by file (the info file last)
        with tempfile.TemporaryDirectory() as local:
            storage.upload_tree(save(tokenizer, local), storage.as_path(directory) / RUN_DIR, last=[INFO_FILE])
        return storage.as_path(directory) / RUN_DIR
    target = pathlib.Path(directory) / RUN_DIR
    target.mkdir(parents=True, exist_ok=True)
    info = {"kind": name, "vocab_size": int(tokenizer.vocab_size), "eod_id": int(tokenizer.eod_id)}
    if name in MODEL_FILES:
        source, model = pathlib.Path(tokenizer.path), target / MODEL_FILES[name]
        if source.resolve() != model.resolve():
            with tempfile.NamedTemporaryFile(dir=target, delete=False) as tmp:
                tmp.write(source.read_bytes())
            os.replace(tmp.name, model)
        info.update(file=model.name, sha256=file_sha256(model))
    with tempfile.NamedTemporaryFile("w", dir=target, delete=False) as tmp:
        json.dump(info, tmp, indent=2, sort_keys=True)
    os.replace(tmp.name, target / INFO_FILE)
    return target


def load(directory: str | os.PathLike) -> Tokenizer | None:
    """The tokenizer `save` wrote under DIRECTORY/tokenizer/, or None if there is none (older workdirs).

    A workdir in a bucket: the folder is downloaded into the local cache first (storage.cache_dir).
    """
    if storage.is_remote(directory):
        remote = f"{str(directory).rstrip('/')}/{RUN_DIR}"
        if not storage.as_path(remote).joinpath(INFO_FILE).exists():
            return None
        storage.download_tree(remote, storage.cache_dir(str(directory)) / RUN_DIR)
        directory = storage.cache_dir(str(directory))
    target = pathlib.Path(directory) / RUN_DIR
    if not (target / INFO_FILE).exists():
        return None
    info = json.loads((target / INFO_FILE).read_text())
    if info["kind"] == "byte":
        return ByteTokenizer()
    model = target / info["file"]
    if not model.exists() or file_sha256(model) != info["sha256"]:
        raise ValueError(f"{model} is missing or does not match the SHA-256 in {target / INFO_FILE}; the run's "
                         "tokenizer was changed after training: restore it or retrain")
    return SentencePieceTokenizer(model) if info["kind"] == "sentencepiece" else HFTokenizer(model)
