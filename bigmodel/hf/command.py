"""`bigmodel import-hf`: a workdir whose step-0 checkpoint holds a Hugging Face checkpoint's weights."""

from __future__ import annotations

import argparse
import math
import pathlib
import re
import shutil
from typing import Any

import ml_collections
import numpy as np

from bigmodel import config as config_lib
from bigmodel.config import ConfigError
from bigmodel.hf.conversion import convert, family_for_hf
from bigmodel.hf.io import read_config, read_state_dict
from bigmodel.hf.mapping import Params, shapes

# Keys that fix the function the imported weights compute: overrides may not change them.
ARCHITECTURE_KEYS = ("name", "vocab_size", "max_len", "num_layers", "d_model", "num_heads", "d_ff",
                     "tie_embeddings", "type_vocab_size", "layer_norm_eps", "activation", "mup")
DEFAULT_EXPERIMENT = "experiments/gpt_tiny.py"


def default_experiment() -> str:
    """experiments/gpt_tiny.py of the current directory, else of the source checkout."""
    here = pathlib.Path(DEFAULT_EXPERIMENT)
    return str(here if here.is_file() else pathlib.Path(__file__).resolve().parents[2] / DEFAULT_EXPERIMENT)


# What import-hf needs from a Hub repository: the config, the weights, the tokenizer.
HUB_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"]
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def resolve_source(src: str | pathlib.Path) -> pathlib.Path:
    """A local checkpoint directory as given, else a Hub name (OWNER/NAME) downloaded through huggingface_hub."""
    path = pathlib.Path(src)
    if path.exists() or not HUB_NAME.fullmatch(str(src)):
        return path
    import huggingface_hub
    from huggingface_hub import errors

    how = (f"download it where the network allows (hf download {src} --local-dir DIR) and pass --from DIR, "
           "a local checkpoint directory")
    try:
        return pathlib.Path(huggingface_hub.snapshot_download(str(src), allow_patterns=HUB_FILES))
    except errors.RepositoryNotFoundError:
        raise ConfigError(f"--from {src}: no such local directory, and the Hugging Face Hub has no (public) model "
                          "of that name; check the name, or pass a local checkpoint directory") from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, OSError) as e:
        offline = huggingface_hub.constants.HF_HUB_OFFLINE
        why = "HF_HUB_OFFLINE is set" if offline else f"the Hugging Face Hub cannot be reached ({type(e).__name__})"
        raise ConfigError(f"--from {src}: no such local directory, and {why} and the model is not in the local "
                          f"Hub cache; {how}") from None


def _step0_state(config: ml_collections.ConfigDict, params: Params) -> Any:
    """A host-side (numpy) TrainState at step 0 holding `params` and a fresh optimizer state.

    Host arrays keep device memory free and make the save cheap; the trainer restores them
    straight onto its own shardings.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from bigmodel import sharding, train

    module, task, tx = train.setup_model(config, sharding.axis_sizes())[2:5]
    try:
        host = jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without 'cpu': the default device will do
        host = None
    with jax.default_device(host):
        opt_state = jax.device_get(jax.jit(tx.init)(params))
    zero = np.zeros((), np.int32)
    state = train.TrainState(step=zero, params=params, opt_state=opt_state, model_state={}, skipped_steps=zero)
    # The trainer's own initial state, abstractly: a mismatch here would otherwise surface as a
    # checkpoint that fails to restore.
    dummy = {"inputs": jnp.zeros((1, min(config.data.seq_len, config.model.max_len)), jnp.int32)}
    expected = nn.meta.unbox(jax.eval_shape(train.init_fn(module, task, tx, dummy), jax.random.key(0)))
    same = jax.tree.structure(expected) == jax.tree.structure(state) and all(
        a.shape == np.shape(b) and a.dtype == np.asarray(b).dtype
        for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(state)))
    if not same:
        raise ValueError(f"the imported state does not match what the trainer builds for model {config.model.name!r}")
    return state


def _classifier_params(config: ml_collections.ConfigDict, encoder: Params, weights: dict) -> Params:
    """A BertClassifier's params: the imported encoder, the checkpoint's pooler if it has one, a fresh head."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from bigmodel import models

    dummy = jnp.zeros((1, min(8, config.model.max_len)), jnp.int32)
    init = jax.jit(models.build(config.model).init)(jax.random.key(config.seed), dummy)
    fresh = jax.tree.map(np.asarray, nn.meta.unbox(init["params"]))
    pooler = fresh["bert"]["pooler"]
    for pre in ("bert.", ""):
        if f"{pre}pooler.dense.weight" in weights:  # nn.Linear [out, in] -> Dense [in, out]
            pooler = {"kernel": weights[f"{pre}pooler.dense.weight"].T, "bias": weights[f"{pre}pooler.dense.bias"]}
            break
    return {**fresh, "bert": {**encoder, "pooler": pooler}}


def import_hf(src: str | pathlib.Path, workdir: str | pathlib.Path, config_spec: str | None = None,
              overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """Write a workdir (config.json, step-0 checkpoint, tokenizer) from a HF checkpoint; returns its config.

    The config is the experiment's (default experiments/gpt_tiny.py) with `model` replaced by
    the imported model (a BERT under a 'classify' experiment: its encoder and pooler, with the
    experiment's num_classes and a fresh classifier head), `data.tokenizer` set to 'hf:WORKDIR/tokenizer.json' when the
    checkpoint ships one, then the 'KEY=VALUE' overrides (which may not change the
    architecture).
    """
    import jax

    from bigmodel import checkpoint, train

    workdir = pathlib.Path(workdir)
    config_spec = config_spec or default_experiment()
    src = resolve_source(src)
    hf = read_config(src)
    family = family_for_hf(hf)
    model_cfg = family.config_from_hf(hf)
    if (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir()):
        raise ConfigError(f"{workdir} already holds checkpoints; import into a new --workdir")
    config = config_lib.load(config_spec)
    classify = config.task == "classify" and model_cfg.name == "bert"  # the encoder under a fresh classifier
    if config.task != family.task and not classify:
        raise ConfigError(f"{src} is a {model_cfg.name} checkpoint, which trains on task {family.task!r}, but "
                          f"{config_spec} sets config.task={config.task!r}; pass --config with a {family.task!r} "
                          "experiment")
    has_tokenizer = (src / "tokenizer.json").is_file()
    with config.unlocked():
        model = ml_collections.ConfigDict(model_cfg.to_dict())  # a copy: overrides must not touch model_cfg
        if classify:
            model.head, model.num_classes = "classify", config.model.num_classes
        config.model = model
        if has_tokenizer:
            config.data.tokenizer = f"hf:{(workdir / 'tokenizer.json').resolve()}"
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} has no value; write --config.{key}=VALUE")
        config_lib.apply_override(config, key, value)
    for key in ARCHITECTURE_KEYS:
        if key in model_cfg and config.model[key] != model_cfg[key]:
            raise ConfigError(f"config.model.{key} is fixed by the checkpoint ({model_cfg[key]!r}); drop that override")
    if has_tokenizer:
        from bigmodel.data import tokenizers

        ids = tokenizers.HFTokenizer(src / "tokenizer.json").vocab_size
        if ids > model_cfg.vocab_size:
            raise ConfigError(f"{src}/tokenizer.json has {ids} ids but the model only {model_cfg.vocab_size}; "
                              "is it the tokenizer of this checkpoint?")
    if config.data.tokenizer == "byte" and model_cfg.vocab_size < 257:
        raise ConfigError(
            f"{src} has no tokenizer.json and the model's vocabulary ({model_cfg.vocab_size}) is smaller than the "
            "byte tokenizer's 257 ids; put the checkpoint's tokenizer.json (a Hugging Face fast tokenizer) beside it"
        )
    config_lib.validate(config, jax.device_count())

    weights = read_state_dict(src)
    params = convert(weights, model_cfg, config.seed, family=family)
    if classify:
        params = _classifier_params(config, params["bert"], weights)
    state = _step0_state(config, params)
    workdir.mkdir(parents=True, exist_ok=True)
    if has_tokenizer:
        shutil.copyfile(src / "tokenizer.json", workdir / "tokenizer.json")
    ckpt = checkpoint.Checkpointer(workdir, keep=config.checkpoint.keep, async_save=False)
    ckpt.save(0, state, None, config.to_dict())  # no data iterator: training starts a fresh one
    ckpt.close()
    train.write_json(workdir / "config.json", config.to_dict())
    count = sum(math.prod(shape) for shape in shapes(params).values())
    print(f"imported {src} ({model_cfg.name}, {count:,} params) into {workdir} as step 0; "
          f"tokenizer {config.data.tokenizer!r}", flush=True)
    return config


def cmd_import_hf(args: argparse.Namespace) -> int:
    """Import a HF checkpoint into a new workdir and say how to use it."""
    config = import_hf(getattr(args, "from"), args.workdir, args.config, args.overrides)
    print(f"fine-tune: bigmodel train --config {args.workdir}/config.json --workdir {args.workdir}", flush=True)
    if config.task == "lm":
        print(f"sample:    bigmodel generate --workdir {args.workdir}", flush=True)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `bigmodel import-hf`."""
    p = subparsers.add_parser(
        "import-hf", help="turn a Hugging Face GPT-2/Llama/BERT checkpoint into a workdir to fine-tune or sample from",
        description="Writes WORKDIR/config.json (the experiment's groups with the imported model) and a step-0 "
                    "checkpoint; --config.KEY=VALUE overrides apply to that config. Then: bigmodel train "
                    "--config WORKDIR/config.json --workdir WORKDIR",
    )
    p.add_argument("--from", required=True, metavar="DIR|NAME",
                   help="HF checkpoint directory (config.json + weights), or a Hub model name (OWNER/NAME) to download")
    p.add_argument("--workdir", required=True, help="new run directory")
    p.add_argument("--config", default=None,
                   help="experiments/NAME.py[:ARG] whose data/optim/train/… groups to use "
                        f"(default {DEFAULT_EXPERIMENT})")
    p.set_defaults(func=cmd_import_hf, takes_overrides=True)
