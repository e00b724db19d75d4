"""Model families. `build(config.model)` turns a model config into a linen module."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import ml_collections

from bigmodel.models import gpt

# family name -> (config-from-size, module-from-config)
FAMILIES: dict[str, tuple[Callable[[str], ml_collections.ConfigDict], Callable[[ml_collections.ConfigDict], nn.Module]]] = {
    "gpt": (gpt.model_config, lambda c: gpt.GPT(gpt.GPTConfig.from_config(c))),
}


def model_config(spec: str) -> ml_collections.ConfigDict:
    """Model config for 'family:size', e.g. 'gpt:124m'."""
    family, _, size = spec.partition(":")
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[family][0](size)


def build(cfg: ml_collections.ConfigDict) -> nn.Module:
    """Instantiate the linen module named by `cfg.name`."""
    if cfg.name not in FAMILIES:
        raise ValueError(f"unknown config.model.name {cfg.name!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[cfg.name][1](cfg)
