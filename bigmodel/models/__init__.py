"""Model families. `build(config.model)` turns a model config into a linen module."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import ml_collections

from bigmodel.models import bert, gpt, resnet, rnn, transformer, vit

# family name -> (config-from-size, module-from-config)
FAMILIES: dict[str, tuple[Callable[[str], ml_collections.ConfigDict], Callable[[ml_collections.ConfigDict], nn.Module]]] = {
    "gpt": (gpt.model_config, lambda c: gpt.GPT(gpt.GPTConfig.from_config(c))),
    "bert": (bert.model_config, bert.build),  # head 'mlm' -> BertMLM, 'classify' -> BertClassifier
    "transformer": (
        transformer.model_config,
        lambda c: transformer.Transformer(transformer.TransformerConfig.from_config(c)),
    ),
    "vit": (vit.model_config, lambda c: vit.ViT(vit.ViTConfig.from_config(c))),
    "resnet": (resnet.model_config, lambda c: resnet.ResNet(resnet.ResNetConfig.from_config(c))),
    "cnn": (resnet.cnn_model_config, lambda c: resnet.CNN(resnet.CNNConfig.from_config(c))),
    "rnn": (rnn.model_config, rnn.build),  # cell 'lstm' | 'gru'; head 'lm' -> RNNLM, 'classify' -> RNNClassifier
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
