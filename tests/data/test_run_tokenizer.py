"""A run's tokenizer kept in WORKDIR/tokenizer/: saved and loaded for byte, SentencePiece and Hugging Face kinds."""

import json

import numpy as np
import pytest

from bigmodel.data import tokenizers

TEXT = "def f(x):\n    return x + 1  # ünïcode\n"
CORPUS = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 3 for i in range(300)]


def roundtrip(tok, tmp_path):
    assert tokenizers.save(tok, tmp_path) == tmp_path / "tokenizer"
    loaded = tokenizers.load(tmp_path)
    assert type(loaded) is type(tok)
    assert (loaded.vocab_size, loaded.eod_id) == (tok.vocab_size, tok.eod_id)
    np.testing.assert_array_equal(loaded.encode(TEXT), tok.encode(TEXT))
    np.testing.assert_array_equal(loaded.token_bytes, tok.token_bytes)
    assert loaded.decode(loaded.encode(TEXT)) == tok.decode(tok.encode(TEXT))
    return loaded


def test_byte(tmp_path):
    roundtrip(tokenizers.ByteTokenizer(), tmp_path)
    info = json.loads((tmp_path / "tokenizer" / tokenizers.INFO_FILE).read_text())
    assert info == {"kind": "byte", "vocab_size": 257, "eod_id": 256}


def test_sentencepiece_copies_the_model_and_refuses_a_changed_one(tmp_path):
    tok = tokenizers.train_sentencepiece(CORPUS, 300, tmp_path / "cache" / "spm.model")
    run = tmp_path / "run"
    roundtrip(tok, run)
    info = json.loads((run / "tokenizer" / tokenizers.INFO_FILE).read_text())
    assert info["file"] == "tokenizer.model"
    assert info["sha256"] == tokenizers.file_sha256(tmp_path / "cache" / "spm.model")
    (run / "tokenizer" / "tokenizer.model").write_bytes(b"not the model")
    with pytest.raises(ValueError, match="does not match the SHA-256"):
        tokenizers.load(run)


def test_hugging_face_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = tokenizers.HFTokenizer(tmp_path / "tokenizer.json")
    loaded = roundtrip(tok, tmp_path / "run")
    assert loaded.decode(loaded.encode(TEXT)) == TEXT


def test_a_workdir_without_one_gives_none(tmp_path):
    assert tokenizers.load(tmp_path) is None
