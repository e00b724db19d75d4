"""Model families. `check(config.model)` refuses a bad model config; `build(config.model)` makes the module."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import ml_collections

from bigmodel.config import ConfigError
from bigmodel.models import bert, gpt, resnet, rnn, transformer, vit
from bigmodel.models.fields import ModelConfig


class Family(NamedTuple):
    """A model family: its named sizes as `config.model`, its frozen config, and its module."""

    model_config: Callable[[str], ml_collections.ConfigDict]
    config: type[ModelConfig]
    module: Callable[[Any], nn.Module]


FAMILIES: dict[str, Family] = {
    "gpt": Family(gpt.model_config, gpt.GPTConfig, gpt.GPT),
    "bert": Family(bert.model_config, bert.BertConfig, bert.build),  # head 'mlm' | 'classify'
    "transformer": Family(transformer.model_config, transformer.TransformerConfig, transformer.Transformer),
    "vit": Family(vit.model_config, vit.ViTConfig, vit.ViT),
    "resnet": Family(resnet.model_config, resnet.ResNetConfig, resnet.ResNet),
    "cnn": Family(resnet.cnn_model_config, resnet.CNNConfig, resnet.CNN),
    "rnn": Family(rnn.model_config, rnn.RNNConfig, rnn.build),  # cell 'lstm' | 'gru'; head 'lm' | 'classify'
}


def model_config(spec: str) -> ml_collections.ConfigDict:
    """Model config for 'family:size', e.g. 'gpt:124m'."""
    family, _, size = spec.partition(":")
    if family not in FAMILIES:
        raise ConfigError(f"unknown model family {family!r}; choose one of {', '.join(sorted(FAMILIES))}")
    return FAMILIES[family].model_config(size)


def check(cfg: ml_collections.ConfigDict) -> ModelConfig:
    """The frozen config of `config.model`'s family; a ConfigError names any unknown, mistyped or impossible key."""
    known = ", ".join(sorted(FAMILIES))
    if "name" not in cfg:
        raise ConfigError(f"config.model has no name; start config.model from a family's model_config ({known})")
    if cfg["name"] not in FAMILIES:
        raise ConfigError(f"config.model.name={cfg['name']!r} is not a model family; use one of {known}")
    return FAMILIES[cfg["name"]].config.from_config(cfg)


def build(cfg: ml_collections.ConfigDict) -> nn.Module:
    """Instantiate the linen module named by `cfg.name`, its fields checked first."""
    return FAMILIES[cfg["name"]].module(check(cfg))
