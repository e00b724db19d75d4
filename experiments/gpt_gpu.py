r"""GPT-2-style models at GPU scale: throughput and MFU of the train step on one accelerator.

Command:   bigmodel bench train --config experiments/gpt_gpu.py:124m --steps 10
           (all sizes and both lengths: bash benchmarks/gpu.sh; training works too:
           bigmodel train --config experiments/gpt_gpu.py:124m --workdir runs/gpt_124m)
Hardware:  one GPU with 80 GB or more (H100, H200). On a CPU only `bigmodel plan` makes sense.
Wall time: not measured on a GPU yet (2000 steps per size). ':tiny' (bigmodel train --config
           experiments/gpt_gpu.py:tiny --workdir runs/gpt_gpu_tiny) took 65 s on 2 CPU cores shared
           with other jobs: dataset build, 23 s compiling, 30 steps and 3 evaluations.
Variants:  ':124m', ':350m', ':1.3b' (gpt.SIZES), each at sequence 1024, or 2048 with ',2048'
           (':1.3b,2048'). The stdlib byte data of experiments/gpt_tiny.py feeds a model with
           GPT-2's 50,257-entry vocabulary, so the output head costs what GPT-2's does.
           ':tiny' puts this recipe (bfloat16 compute, stacked blocks, 'dots' remat, prefetch)
           on gpt_tiny's ':tiny' model and data, to try the recipe on a CPU.
Recipe:    bfloat16 compute with float32 parameters, gradients and Adam moments; cuDNN's fused
           attention through jax.nn.dot_product_attention; the train state donated to the step
           (the trainer's and the benchmark's jit); batches on the device a step ahead; blocks
           stacked with nn.scan (compile time flat in depth). Remat per size from `bigmodel plan
           --config experiments/gpt_gpu.py:SIZE --mesh 1,1,1 --target h100-80gb --no-compile
           --config.model.remat=none`: no remat where that leaves 16 GiB or more of the 72
           usable (124M 32/41 GiB, 350M 35/47 GiB at sequence 1024/2048), 'dots' (matmul
           outputs kept, the rest recomputed) where not (1.3B 62/74 GiB). The estimate counts
           attention probabilities that the fused kernel never stores, so it errs on the safe side.
Expected:  not measured yet (no GPU was at hand when this file was written); the target is
           MFU >= 0.5 of 989 TFLOP/s (H100/H200 dense bfloat16) at 1.3B. ':tiny' ends at about
           5.1 bits/byte after its 30 steps (5.119 measured).
"""

import pathlib

import ml_collections

from bigmodel import config as config_lib
from bigmodel.models import gpt

base = config_lib.experiment_module(pathlib.Path(__file__).with_name("base.py"))

# (batch, remat) per size and sequence length: 16k-32k tokens per step.
SHAPES = {
    ("124m", 1024): (32, "none"),
    ("124m", 2048): (16, "none"),
    ("350m", 1024): (16, "none"),
    ("350m", 2048): (8, "none"),
    ("1.3b", 1024): (16, "dots"),
    ("1.3b", 2048): (8, "dots"),
}
VARIANTS = ("", "tiny") + tuple(size if seq == 1024 else f"{size},{seq}" for size, seq in SHAPES)


def get_config(arg: str = "124m") -> ml_collections.ConfigDict:
    """The gpt_tiny training groups around a GPU-sized GPT; arg 'SIZE' or 'SIZE,SEQ' ('' is '124m'), or 'tiny'."""
    base.check_variant(__file__, arg, VARIANTS)
    if arg == "tiny":
        c = config_lib.sibling_config(__file__, "gpt_tiny.py", "tiny")
        c.model.update(dtype="bfloat16", remat="dots", scan_layers=True)
        c.data.prefetch = 2
        return c
    size, _, seq = (arg or "124m").partition(",")
    seq_len = int(seq or 1024)
    batch, remat = SHAPES[size, seq_len]
    c = config_lib.sibling_config(__file__, "gpt_tiny.py")
    c.model = gpt.model_config(size)
    c.model.update(dtype="bfloat16", remat=remat, scan_layers=True, max_len=seq_len)  # attention: cuDNN
    c.data.seq_len = seq_len
    c.data.prefetch = 2
    c.train.batch_size = batch
    c.train.steps = 2000
    c.optim.learning_rate = 6e-4
    c.optim.warmup_steps = 200
    c.eval.batch_size = batch
    c.eval.every = 1000
    c.eval.num_batches = 20
    c.checkpoint.every = 1000
    c.log.every = 50
    return c
