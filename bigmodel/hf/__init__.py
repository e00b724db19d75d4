"""Hugging Face weight interop: GPT-2, Llama and BERT checkpoints to and from our modules.

  module, params = from_pretrained("path/to/hf_dir")   # config.json + model.safetensors
  logits = module.apply({"params": params}, input_ids)  # [B, T, V]
  save_pretrained(module, params, "path/to/out")       # transformers can load it

What maps:
- GPT2LMHeadModel / GPT2Model / GPT2DoubleHeadsModel <-> `models.gpt.GPT` (gpt2.py).
- LlamaForCausalLM / LlamaModel <-> `models.gpt.GPT` with the Llama switches (llama.py).
- BertForMaskedLM / BertForPreTraining / BertModel <-> `models.bert.BertMLM` (bert.py).
Each family module says what it drops and what it refuses, and describes itself with a
`mapping.Family` (config to and from HF, weights to and from HF); conversion.FAMILIES lists
them, and a new architecture is one more module there. io.py reads and writes checkpoint
directories (config.json, safetensors or PyTorch weights, sharded or not).

`bigmodel import-hf --from DIR --workdir W` (command.py) turns a checkpoint into a workdir
whose step-0 checkpoint holds the imported weights and a fresh optimizer state; fine-tune it
with `bigmodel train --config W/config.json --workdir W`; --from also takes a Hub name.
`bigmodel export-hf --workdir W --out DIR` (export.py) writes a run's checkpoint and tokenizer
as a folder transformers' Auto classes load.
"""

# JAX, Flax and the models are imported inside the functions that need them: the `bigmodel`
# command registers import-hf for every subcommand and should not pay for them each time.
import argparse

from bigmodel.hf import command, export
from bigmodel.hf.command import import_hf
from bigmodel.hf.conversion import (
                                    FAMILIES,
                                    convert,
                                    family_for_hf,
                                    family_for_model,
                                    from_pretrained,
                                    hf_config,
                                    model_config,
                                    module_config,
                                    save_pretrained,
)
from bigmodel.hf.export import export_hf
from bigmodel.hf.io import read_config, read_state_dict


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `bigmodel import-hf` and `bigmodel export-hf`."""
    command.register(subparsers)
    export.register(subparsers)


__all__ = ["FAMILIES", "convert", "export_hf", "family_for_hf", "family_for_model", "from_pretrained", "hf_config",
           "import_hf", "model_config", "module_config", "read_config", "read_state_dict", "register",
           "save_pretrained"]
