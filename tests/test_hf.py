"""Hugging Face interop: logits parity both ways, import-hf into a workdir, generate and fine-tune.

Every model here is a small randomly initialised `transformers` model built on the spot;
nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from bigmodel import checkpoint, cli, config as config_lib, generate, hf, metrics
from bigmodel.config import ConfigError
from bigmodel.data import pipeline, tokenizers

from conftest import GPT_TINY

transformers.logging.set_verbosity_error()
VOCAB = 300  # above the byte tokenizer's 257 ids, so imported GPTs train on bytes
SMALL = dict(d=64, layers=2, heads=4)


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (LayerNorm scales and biases too), so a swapped or transposed tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def hf_gpt(tie: bool = True, seed: int = 0) -> torch.nn.Module:
    cfg = transformers.GPT2Config(n_embd=SMALL["d"], n_layer=SMALL["layers"], n_head=SMALL["heads"], vocab_size=VOCAB,
                                  n_positions=64, tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None)
    return randomise(transformers.GPT2LMHeadModel(cfg), seed)


def hf_bert(seed: int = 0) -> torch.nn.Module:
    cfg = transformers.BertConfig(hidden_size=SMALL["d"], num_hidden_layers=SMALL["layers"],
                                  num_attention_heads=SMALL["heads"], intermediate_size=128, vocab_size=VOCAB,
                                  max_position_embeddings=64)
    return randomise(transformers.BertForMaskedLM(cfg), seed)


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def hf_llama(kv_heads: int = 2, tie: bool = False, rope: dict | None = None, seed: int = 0) -> torch.nn.Module:
    """A small LlamaForCausalLM: GQA with `kv_heads`, theta 5000, the given rope scaling."""
    cfg = transformers.LlamaConfig(
        hidden_size=SMALL["d"], num_hidden_layers=SMALL["layers"], num_attention_heads=SMALL["heads"],
        num_key_value_heads=kv_heads, intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=64,
        tie_word_embeddings=tie, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None,
        rope_parameters={"rope_theta": 5000.0, **(rope or {"rope_type": "default"})})
    return randomise(transformers.LlamaForCausalLM(cfg), seed)


def torch_logits(model: torch.nn.Module, ids: np.ndarray, bert: bool = False) -> np.ndarray:
    kwargs = {"attention_mask": torch.tensor(ids != 0)} if bert else {}  # our BERT masks [PAD] = 0 keys
    with torch.no_grad():
        return model(torch.tensor(ids), **kwargs).logits.numpy()


def our_logits(module, params, ids: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(module.apply)({"params": params}, jnp.asarray(ids)))


IDS = np.random.RandomState(0).randint(1, VOCAB, (2, 24))
IDS_PADDED = IDS.copy()
IDS_PADDED[1, 17:] = 0


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape == (2, 24, VOCAB)
    assert np.std(b) > 0.5  # logits of real size, so 1e-4 is a tight bound
    diff = float(np.abs(a - b).max())
    print(f"max abs logit difference {diff:.2e} (logits std {np.std(b):.2f})")
    return diff


@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_import_and_export_match_transformers(tmp_path, tie):
    ref = hf_gpt(tie)
    ref.save_pretrained(tmp_path / "hf")
    module, params = hf.from_pretrained(tmp_path / "hf")
    assert module.cfg.tie_embeddings is tie and module.cfg.num_heads == 4 and module.cfg.max_len == 64
    assert params["block_0"]["attn"]["query_kernel"].shape == (64, 4, 16)
    assert ("lm_head" in params) is not tie
    ours = our_logits(module, params, IDS)
    assert max_diff(ours, torch_logits(ref, IDS)) < 1e-4

    hf.save_pretrained(module, params, tmp_path / "ours")
    back, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert max_diff(ours, torch_logits(back.eval(), IDS)) < 1e-4


@pytest.mark.parametrize("kv_heads,tie,rope", [(2, False, None), (1, False, LLAMA3_ROPE),
                                              (4, True, {"rope_type": "linear", "factor": 4.0})],
                         ids=["llama2-gqa", "llama3-scaling-mqa", "linear-scaling-tied"])
def test_llama_import_and_export_match_transformers(tmp_path, kv_heads, tie, rope):
    ref = hf_llama(kv_heads, tie, rope)
    ref.save_pretrained(tmp_path / "hf")
    module, params = hf.from_pretrained(tmp_path / "hf")
    cfg = module.cfg
    assert (cfg.position, cfg.norm, cfg.activation, cfg.use_bias) == ("rope", "rmsnorm", "swiglu", False)
    assert cfg.rope_base == 5000.0 and cfg.num_kv_heads == (0 if kv_heads == 4 else kv_heads)
    assert cfg.rope_scaling == (rope or {"rope_type": "none"})["rope_type"] and cfg.tie_embeddings is tie
    assert params["block_0"]["attn"]["key_kernel"].shape == (64, kv_heads, 16) and ("lm_head" in params) is not tie
    ours = our_logits(module, params, IDS)
    assert max_diff(ours, torch_logits(ref, IDS)) < 1e-4
    if rope:  # the scaling matters at these positions: without it the logits differ
        plain = module.clone(cfg=dataclasses.replace(cfg, rope_scaling="none"))
        assert np.abs(our_logits(plain, params, IDS) - ours).max() > 1e-2

    hf.save_pretrained(module, params, tmp_path / "ours")
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert type(back).__name__ == "LlamaForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert max_diff(ours, torch_logits(back.eval(), IDS)) < 1e-4


def test_llama_model_without_head_keeps_the_body(tmp_path):
    ref = hf_llama(seed=8)
    ref.model.save_pretrained(tmp_path / "hf")  # LlamaModel: no lm_head.weight
    with pytest.warns(UserWarning, match="no lm_head"):
        _, params = hf.from_pretrained(tmp_path / "hf")
    np.testing.assert_array_equal(params["block_1"]["mlp"]["fc_gate"]["kernel"],
                                  ref.model.layers[1].mlp.gate_proj.weight.detach().numpy().T)
    assert params["lm_head"]["kernel"].shape == (64, VOCAB) and float(np.std(params["lm_head"]["kernel"])) > 0


def test_llama_config_spellings_and_refusals():
    """transformers 4's rope_theta/rope_scaling spelling reads as 5's rope_parameters; what we cannot run is refused."""
    v5 = hf_llama(rope=LLAMA3_ROPE).config.to_dict()
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4 |= {"rope_theta": 5000.0, "rope_scaling": {"type": "llama3", **{k: v for k, v in LLAMA3_ROPE.items()
                                                                      if k != "rope_type"}}}
    assert hf.model_config(v4).to_dict() == hf.model_config(v5).to_dict()
    assert hf.model_config(v4).rope_original_max_len == 16 and hf.model_config(v4).rope_factor == 8.0
    with pytest.raises(ValueError, match="rope scaling type 'yarn'"):
        hf.model_config(v5 | {"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ValueError, match="attention_bias=True"):
        hf.model_config(v5 | {"attention_bias": True})
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        hf.model_config(v5 | {"hidden_act": "gelu"})


def test_gpt2_pytorch_bin_and_scanned_layers(tmp_path):
    """pytorch_model.bin (GPT2Model-style keys plus old mask buffers) into a scan_layers GPT, and back."""
    ref = hf_gpt(seed=1)
    (tmp_path / "bin").mkdir()
    ref.config.to_json_file(tmp_path / "bin" / "config.json")
    state = {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    state["transformer.h.0.attn.bias"] = torch.tril(torch.ones(64, 64))[None, None]  # as in old checkpoints
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    cfg = hf.model_config(hf.read_config(tmp_path / "bin"))
    cfg.scan_layers = True
    params = hf.convert(hf.read_state_dict(tmp_path / "bin"), cfg)
    assert params["blocks"]["attn"]["query_kernel"].shape == (2, 64, 4, 16)
    from bigmodel import models

    module = models.build(cfg)
    ours = our_logits(module, params, IDS)
    assert max_diff(ours, torch_logits(ref, IDS)) < 1e-4
    hf.save_pretrained(module, params, tmp_path / "ours")
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    assert max_diff(ours, torch_logits(back, IDS)) < 1e-4


def test_half_precision_checkpoints_read_as_float32(tmp_path):
    from safetensors.torch import save_file

    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.randn(4).half(), "ids": torch.arange(6)}
    save_file(tensors, tmp_path / "model.safetensors")
    state = hf.read_state_dict(tmp_path)
    assert state["a"].dtype == state["b"].dtype == np.float32 and state["ids"].dtype == np.int64
    for name in ("a", "b"):
        np.testing.assert_array_equal(state[name], tensors[name].float().numpy())
    np.testing.assert_array_equal(state["ids"], np.arange(6))


def test_bert_import_and_export_match_transformers(tmp_path):
    ref = hf_bert()
    ref.save_pretrained(tmp_path / "hf")
    module, params = hf.from_pretrained(tmp_path / "hf")
    assert module.cfg.activation == "gelu" and module.cfg.layer_norm_eps == 1e-12
    ours = our_logits(module, params, IDS_PADDED)
    assert max_diff(ours, torch_logits(ref, IDS_PADDED, bert=True)) < 1e-4

    hf.save_pretrained(module, params, tmp_path / "ours")
    back, info = transformers.BertForMaskedLM.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert max_diff(ours, torch_logits(back.eval(), IDS_PADDED, bert=True)) < 1e-4


def test_bert_model_without_mlm_head_keeps_the_encoder(tmp_path):
    ref = hf_bert(seed=2)
    encoder = transformers.BertModel(ref.config, add_pooling_layer=True)
    encoder.load_state_dict({k[len("bert."):]: v for k, v in ref.state_dict().items() if k.startswith("bert.")},
                            strict=False)
    encoder.save_pretrained(tmp_path / "hf")
    with pytest.warns(UserWarning, match="no MLM head"):
        _, params = hf.from_pretrained(tmp_path / "hf")
    assert "pooler" not in params["bert"]  # dropped: BertMLM has none
    np.testing.assert_array_equal(params["bert"]["layer_1"]["mlp"]["fc_in"]["kernel"],
                                  ref.bert.encoder.layer[1].intermediate.dense.weight.detach().numpy().T)
    np.testing.assert_array_equal(params["mlm_bias"], 0.0)  # freshly initialised head


def test_unsupported_configs_are_refused(tmp_path):
    base = hf_gpt().config.to_dict()
    with pytest.raises(ValueError, match="activation_function='relu'"):
        hf.model_config(base | {"activation_function": "relu"})
    with pytest.raises(ValueError, match="layer_norm_epsilon"):
        hf.model_config(base | {"layer_norm_epsilon": 1e-6})
    bert = hf_bert().config.to_dict()
    with pytest.raises(ValueError, match="hidden_act='silu'"):
        hf.model_config(bert | {"hidden_act": "silu"})
    with pytest.raises(ValueError, match="model_type='mistral'"):
        hf.model_config({"model_type": "mistral"})


def test_config_load_accepts_a_workdir_config_json(tmp_path):
    config = config_lib.load(GPT_TINY + ":tiny")
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    loaded = config_lib.load(str(tmp_path / "config.json"), ["train.steps=7", "optim.learning_rate=0.5"])
    assert loaded.train.steps == 7 and loaded.optim.learning_rate == 0.5
    assert loaded.model.to_dict() == config.model.to_dict()
    with pytest.raises(ConfigError, match="unknown config key"):
        config_lib.load(str(tmp_path / "config.json"), ["train.stepz=7"])
    with pytest.raises(ConfigError, match="does not exist"):
        config_lib.load(str(tmp_path / "missing.json"))


def byte_level_tokenizer(path) -> None:
    """A tiny GPT-2-style byte-level BPE tokenizer.json with <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def forward(self, x):\n    return x + 1\n"] * 20 + ["héllo wörld"], trainer)
    tok.save(str(path))


def test_hf_tokenizer(tmp_path):
    byte_level_tokenizer(tmp_path / "tokenizer.json")
    tok = pipeline.make_tokenizer(ml_collections.ConfigDict({"tokenizer": f"hf:{tmp_path / 'tokenizer.json'}"}), None)
    assert isinstance(tok, tokenizers.HFTokenizer) and tok.eod_id == 0 and tok.vocab_size == 280
    text = "def f(x):\n    return 'héllo' + x  # ☃\n"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and len(ids) < len(text.encode())  # merges were learnt
    assert tok.decode(ids) == text and tok.decode([tok.eod_id, *ids]) == text
    assert tok.token_bytes[ids].sum() == len(text.encode("utf-8"))  # exact for byte-level BPE
    assert tok.token_bytes[tok.eod_id] == 0
    with pytest.raises(ConfigError, match="does not exist"):
        pipeline.make_tokenizer(ml_collections.ConfigDict({"tokenizer": f"hf:{tmp_path / 'nope.json'}"}), None)


def test_import_hf_tokenizer_choice(tmp_path, tiny_overrides):
    def tiny_gpt(path, vocab: int) -> None:
        cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=vocab, n_positions=64,
                                      bos_token_id=None, eos_token_id=None)
        transformers.GPT2LMHeadModel(cfg).save_pretrained(path)

    tiny_gpt(tmp_path / "v200", 200)
    with pytest.raises(ConfigError, match="no tokenizer.json .* smaller than the byte tokenizer"):
        hf.import_hf(tmp_path / "v200", tmp_path / "w0", GPT_TINY + ":tiny", tiny_overrides)
    tiny_gpt(tmp_path / "v300", 300)
    with pytest.raises(ConfigError, match="config.model.num_layers is fixed by the checkpoint"):
        hf.import_hf(tmp_path / "v300", tmp_path / "w0", GPT_TINY + ":tiny", ["model.num_layers=3"])
    hf_bert().save_pretrained(tmp_path / "bert")
    with pytest.raises(ConfigError, match="trains on task 'mlm'"):
        hf.import_hf(tmp_path / "bert", tmp_path / "w0", GPT_TINY + ":tiny")
    assert not (tmp_path / "w0").exists()  # refused before writing anything

    byte_level_tokenizer(tmp_path / "v200" / "tokenizer.json")  # 280 ids: too many for this model
    with pytest.raises(ConfigError, match="280 ids but the model only 200"):
        hf.import_hf(tmp_path / "v200", tmp_path / "w0", GPT_TINY + ":tiny", tiny_overrides)
    byte_level_tokenizer(tmp_path / "v300" / "tokenizer.json")
    config = hf.import_hf(tmp_path / "v300", tmp_path / "w1", GPT_TINY + ":tiny", tiny_overrides)
    assert config.data.tokenizer == f"hf:{(tmp_path / 'w1' / 'tokenizer.json').resolve()}"
    assert (tmp_path / "w1" / "tokenizer.json").read_bytes() == (tmp_path / "v300" / "tokenizer.json").read_bytes()
    assert json.loads((tmp_path / "w1" / "config.json").read_text())["data"]["tokenizer"] == config.data.tokenizer
    assert (tmp_path / "w1" / "checkpoints" / "0").is_dir()
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        hf.import_hf(tmp_path / "v300", tmp_path / "w1", GPT_TINY + ":tiny", tiny_overrides)


def reference_greedy(model: torch.nn.Module, prompt: bytes, n: int) -> str:
    """Greedy bytes from the PyTorch model, as `generate` does: start at end-of-document, stop at it."""
    ids = [256, *prompt]
    out = []
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1, :257]  # the byte tokenizer's ids only
        tok = int(logits.argmax())
        if tok == 256:
            break
        ids.append(tok)
        out.append(tok)
    return (prompt + bytes(out)).decode("utf-8", errors="replace")


@pytest.mark.slow
def test_import_hf_then_generate_and_fine_tune(tmp_path, tiny_overrides, capsys):
    ref = hf_gpt(seed=3)
    ref.save_pretrained(tmp_path / "hf")
    work = tmp_path / "work"
    args = ["import-hf", "--from", str(tmp_path / "hf"), "--workdir", str(work), "--config", GPT_TINY + ":tiny"]
    assert cli.main(args + [f"--config.{o}" for o in tiny_overrides] + ["--config.model.dropout=0"]) == 0
    assert f"bigmodel train --config {work}/config.json --workdir {work}" in capsys.readouterr().out
    saved = json.loads((work / "config.json").read_text())
    assert saved["model"]["num_layers"] == 2 and saved["model"]["vocab_size"] == VOCAB
    assert saved["data"]["tokenizer"] == "byte" and saved["train"]["steps"] == 30  # the ':tiny' groups

    # The step-0 checkpoint holds exactly the imported weights.
    _, _, variables, _ = generate.load_run(str(work), step=0)
    _, imported = hf.from_pretrained(tmp_path / "hf")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables["params"]), imported)

    assert cli.main(["generate", "--workdir", str(work), "--prompt", "def ", "--max_tokens", "6",
                     "--temperature", "0"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == reference_greedy(ref, b"def ", 6)

    train = ["train", "--config", str(work / "config.json"), "--workdir", str(work), "--config.train.steps=2",
             "--config.log.every=1", "--config.eval.every=2", "--config.checkpoint.every=2"]
    assert cli.main(train) == 0
    rows = metrics.read_jsonl(work / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    # Step 1's loss is the imported model's loss on the first training batch.
    config = config_lib.load(str(work / "config.json"))
    data = pipeline.lm_data(config.data, seed=config.seed, batch_size=config.train.batch_size,
                            eval_batch_size=config.eval.batch_size, num_eval_batches=1, shard=(0, 1))
    batch = next(iter(data.train))
    with torch.no_grad():
        logits = ref(torch.tensor(batch["inputs"])).logits
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), torch.tensor(batch["targets"]).long(),
                                                reduction="none").numpy()
    expected = float((nll * batch["weights"]).sum() / batch["weights"].sum())
    assert rows[0]["loss"] == pytest.approx(expected, rel=1e-4)
    assert math.isfinite(rows[1]["loss"])
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["0", "2"]

    # The trained step-2 weights, exported, compute in transformers what our model computes.
    assert cli.main(["export-hf", "--workdir", str(work), "--out", str(tmp_path / "exported")]) == 0
    module, params = hf.from_pretrained(tmp_path / "exported")
    trained = checkpoint.Checkpointer(work, keep=1, async_save=False)
    jax.tree.map(np.testing.assert_array_equal, params, trained.restore_raw(2)["params"])
    trained.close()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    assert max_diff(our_logits(module, params, IDS), torch_logits(back, IDS)) < 1e-4


def test_export_hf_loads_in_transformers_with_its_tokenizer(tmp_path, tiny_overrides, capsys):
    """import-hf (byte tokenizer) then export-hf: Auto classes load the folder; logits and token ids agree."""
    ref = hf_llama(rope=LLAMA3_ROPE, seed=4)
    ref.save_pretrained(tmp_path / "hf")
    hf.import_hf(tmp_path / "hf", tmp_path / "w", GPT_TINY + ":tiny", tiny_overrides)
    assert cli.main(["export-hf", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "out")]) == 0
    assert "AutoModelForCausalLM" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == "LlamaForCausalLM" and back.config.eos_token_id == 256
    assert max_diff(torch_logits(back, IDS), torch_logits(ref, IDS)) < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "def f(x):\n    return 'héllo' + x  # ☃\n"
    ids = tok(text)["input_ids"]
    assert ids == tokenizers.ByteTokenizer().encode(text).tolist() and tok.decode(ids) == text
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 256

    # Refusals leave nothing behind: an occupied --out, a run that is not a checkpointed model.
    assert cli.main(["export-hf", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "out")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert cli.main(["export-hf", "--workdir", str(tmp_path / "hf"), "--out", str(tmp_path / "o2")]) == 2
    assert not (tmp_path / "o2").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def hub_cache_entry(cache, name: str, model: torch.nn.Module) -> None:
    """Put `model` into a Hugging Face Hub cache as repository `name` (the layout huggingface_hub writes)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + name.replace("/", "--"))
    model.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_import_hf_from_the_hub_offline(tmp_path, tiny_overrides, monkeypatch):
    """A Hub name: offline and uncached, a one-line error saying how to pass a directory; cached, it imports."""
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "cache"), HF_HOME=str(tmp_path / "home"))
    cmd = [sys.executable, "-c", "import sys; from bigmodel import cli; sys.exit(cli.main())", "import-hf", "--from",
           "tiny-org/tiny-llama", "--workdir", str(tmp_path / "w")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "tiny-org/tiny-llama" in line and "HF_HUB_OFFLINE is set" in line and "--from DIR" in line
    assert not (tmp_path / "w").exists()

    import huggingface_hub

    hub_cache_entry(tmp_path / "cache", "tiny-org/tiny-llama", hf_llama(seed=5))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    config = hf.import_hf("tiny-org/tiny-llama", tmp_path / "w", GPT_TINY + ":tiny", tiny_overrides)
    assert config.model.position == "rope" and config.model.num_kv_heads == 2
    assert (tmp_path / "w" / "checkpoints" / "0").is_dir()


def wordpiece_tokenizer(path, vocab_size: int = 600) -> None:
    """A small BERT-style WordPiece tokenizer.json ([PAD] = 0, [UNK], [CLS], [SEP], [MASK]) learnt on stdlib text."""
    import glob

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    from conftest import SMALL_CORPUS

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    texts = [pathlib.Path(f).read_text(encoding="utf-8") for f in sorted(glob.glob(SMALL_CORPUS))]
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    tok.save(str(path))


@pytest.mark.slow
def test_imported_bert_fine_tunes_with_its_wordpiece_vocabulary(tmp_path, data_dir, capsys):
    """import-hf a BERT (with pooler) and its WordPiece tokenizer under bert_classify, then train on the stdlib task."""
    from tokenizers import Tokenizer

    from bigmodel import data as data_lib

    from conftest import REPO

    (tmp_path / "hf").mkdir()
    wordpiece_tokenizer(tmp_path / "hf" / "tokenizer.json")
    wp = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    special = {t: wp.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]")}
    assert special["[PAD]"] == 0 and max(special.values()) < 5
    cfg = transformers.BertConfig(hidden_size=SMALL["d"], num_hidden_layers=SMALL["layers"],
                                  num_attention_heads=SMALL["heads"], intermediate_size=128,
                                  vocab_size=wp.get_vocab_size(), max_position_embeddings=64)
    ref = transformers.BertForPreTraining(cfg).eval()
    ref.save_pretrained(tmp_path / "hf")

    work = tmp_path / "work"
    classify = str(REPO / "experiments" / "bert_classify.py") + ":tiny"
    assert cli.main(["import-hf", "--from", str(tmp_path / "hf"), "--workdir", str(work), "--config", classify,
                     f"--config.data.data_dir={data_dir}", "--config.log.progress=false"]) == 0
    config = config_lib.load(str(work / "config.json"))
    assert (config.task, config.model.head, config.model.num_classes) == ("classify", "classify", 8)
    assert config.model.vocab_size == wp.get_vocab_size() and config.data.tokenizer.endswith("tokenizer.json")

    # Step 0: the checkpoint's encoder and pooler; the classifier head is new.
    saved = checkpoint.Checkpointer(work, keep=1, async_save=False)
    params = saved.restore_raw(0)["params"]
    saved.close()
    np.testing.assert_array_equal(params["bert"]["embeddings"]["word"]["embedding"],
                                  ref.bert.embeddings.word_embeddings.weight.detach().numpy())
    np.testing.assert_array_equal(params["bert"]["pooler"]["kernel"], ref.bert.pooler.dense.weight.detach().numpy().T)
    assert params["head"]["kernel"].shape == (SMALL["d"], 8)

    # Rows are framed with the vocabulary's own [CLS] … [SEP], not ids appended after it.
    data = data_lib.build(config, shard=(0, 1))
    rows = next(iter(data.train))["inputs"]
    assert (rows[:, 0] == special["[CLS]"]).all() and (rows == special["[SEP]"]).sum(axis=1).min() == 1
    assert rows.max() < wp.get_vocab_size() and (rows[:, 1:] == special["[CLS]"]).sum() == 0
    text = data.tokenizer.decode(rows[0])
    assert wp.encode(text, add_special_tokens=False).ids[:5] == rows[0, 1:6].tolist()

    assert cli.main(["train", "--config", str(work / "config.json"), "--workdir", str(work)]) == 0
    rows = metrics.read_jsonl(work / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [5, 10] and all(math.isfinite(r["loss"]) for r in rows)
    summary = json.loads((work / "summary.json").read_text())
    assert 0 <= summary["eval_accuracy"] <= 1 and math.isfinite(summary["eval_loss"])


def test_export_hf_bert_with_its_wordpiece_tokenizer(tmp_path, tiny_overrides):
    """An imported BERT (MLM) exports as BertForMaskedLM whose AutoTokenizer knows [MASK], [CLS] and [SEP]."""
    from conftest import REPO

    (tmp_path / "hf").mkdir()
    wordpiece_tokenizer(tmp_path / "hf" / "tokenizer.json", VOCAB)
    ref = hf_bert(seed=6)
    ref.save_pretrained(tmp_path / "hf")
    stdlib = str(REPO / "experiments" / "bert_stdlib.py") + ":tiny"
    hf.import_hf(tmp_path / "hf", tmp_path / "w", stdlib, tiny_overrides)
    hf.export_hf(tmp_path / "w", tmp_path / "out")
    back = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == "BertForMaskedLM"
    assert max_diff(torch_logits(back, IDS_PADDED, bert=True), torch_logits(ref, IDS_PADDED, bert=True)) < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert (tok.mask_token, tok.cls_token, tok.sep_token, tok.pad_token) == ("[MASK]", "[CLS]", "[SEP]", "[PAD]")
    ids = tok("def message_from_string(s):")["input_ids"]
    ours = tokenizers.HFTokenizer(tmp_path / "w" / "tokenizer.json")
    assert ids == [ours.token_id("[CLS]"), *ours.encode("def message_from_string(s):").tolist(), ours.token_id("[SEP]")]


def test_export_hf_bert_on_bytes_keeps_the_appended_specials(tmp_path, tiny_overrides):
    """A byte-vocabulary BERT's [MASK], [CLS], [SEP] (ids 257-259) reach AutoTokenizer at the same ids."""
    from conftest import REPO

    hf_bert(seed=7).save_pretrained(tmp_path / "hf")  # no tokenizer.json: the byte tokenizer
    hf.import_hf(tmp_path / "hf", tmp_path / "w", str(REPO / "experiments" / "bert_stdlib.py") + ":tiny",
                 tiny_overrides)
    hf.export_hf(tmp_path / "w", tmp_path / "out")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert (tok.mask_token_id, tok.cls_token_id, tok.sep_token_id) == (257, 258, 259)
    assert tok("é[MASK]", add_special_tokens=False)["input_ids"] == [0xC3, 0xA9, 257]
