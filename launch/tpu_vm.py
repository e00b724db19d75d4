"""`bigmodel launch tpu-vm`: the gcloud commands that run one experiment on every worker of a TPU VM slice.

1. pack this checkout and copy it to every worker;
2. install it (with JAX's TPU support) on every worker;
3. start `bigmodel train` on every worker at once. On a TPU slice JAX finds the
   coordinator, the process count and its index itself (bigmodel.distributed).

The workdir must be a path every worker can write, e.g. a Filestore or gcsfuse mount.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import re
import shlex
import subprocess
from collections.abc import Mapping, Sequence

from bigmodel.launch import parse_env, print_command, train_command

from bigmodel.config import ConfigError

# generation -> (what the number in the type counts, GKE accelerator label)
GENERATIONS: dict[str, tuple[str, str]] = {
    "v4": ("cores", "tpu-v4-podslice"),
    "v5p": ("cores", "tpu-v5p-slice"),
    "v5litepod": ("chips", "tpu-v5-lite-podslice"),
    "v5e": ("chips", "tpu-v5-lite-podslice"),
    "v6e": ("chips", "tpu-v6e-slice"),
}
CHIPS_PER_HOST = 4  # multi-host slices of every generation above


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """A TPU slice: its chips and the hosts (VMs or pods) that drive them."""

    accelerator: str  # e.g. 'v5p-64'
    generation: str
    chips: int
    hosts: int
    chips_per_host: int
    gke_accelerator: str


def tpu_slice(accelerator: str) -> TpuSlice:
    """Parse an accelerator type such as 'v5p-64' (64 TensorCores = 32 chips = 8 hosts)."""
    match = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", accelerator)
    if not match:
        raise ConfigError(f"accelerator {accelerator!r} is not like v4-32, v5p-64, v5litepod-16 or v6e-16")
    generation, number = match.group(1), int(match.group(2))
    counts, label = GENERATIONS[generation]
    # v4 and v5p names count TensorCores (two per chip); v5e and v6e names count chips.
    chips = number // 2 if counts == "cores" else number
    if chips < 1:
        raise ConfigError(f"accelerator {accelerator!r} has no whole chip")
    # Single-host v5e/v6e slices put up to 8 chips on one VM; larger slices use 4 per host.
    per_host = chips if counts == "chips" and chips <= 8 else min(CHIPS_PER_HOST, chips)
    return TpuSlice(accelerator, generation, chips, math.ceil(chips / per_host), per_host, label)


def check_topology(tpu: TpuSlice, topology: str) -> str:
    """Refuse a topology whose chip count differs from the slice's."""
    try:
        dims = [int(d) for d in topology.lower().split("x")]
    except ValueError:
        dims = []
    if not dims or math.prod(dims) != tpu.chips:
        raise ConfigError(f"--tpu-topology {topology!r} does not hold the {tpu.chips} chips of {tpu.accelerator} "
                          f"(e.g. {'2x4x4' if tpu.generation in ('v4', 'v5p') else '4x4'} for 32 or 16 chips)")
    return topology.lower()


def commands(*, name: str, zone: str, accelerator: str, config: str, workdir: str, overrides: Sequence[str],
             project: str | None = None, env: Mapping[str, str] | None = None,
             source: str | None = None) -> list[list[str]]:
    """The commands to run, in order: pack SOURCE (default: the current checkout), copy, install, train."""
    tpu_slice(accelerator)  # refuse an unknown type before printing anything
    import jax  # only for its version: the workers install the same one

    source = source or str(pathlib.Path.cwd())  # the checkout the command runs in
    where = ["--zone", zone] + (["--project", project] if project else [])
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, *where, "--worker=all", "--command"]
    archive = f"/tmp/bigmodel-{name}.tar.gz"
    install = (f"mkdir -p bigmodel && tar xzf bigmodel.tar.gz -C bigmodel && python3 -m venv venv && "
               f'venv/bin/pip install -q -e ./bigmodel "jax[tpu]=={jax.__version__}"')
    exports = "".join(f"export {k}={shlex.quote(v)}; " for k, v in (env or {}).items())
    train = shlex.join(train_command(config, workdir, overrides, program="../venv/bin/bigmodel"))
    return [
        ["tar", "czf", archive, "--exclude=.git", "--exclude=.venv*", "--exclude=runs", "-C", source, "."],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, f"{name}:bigmodel.tar.gz", *where, "--worker=all"],
        [*ssh, install],
        # Every worker of the slice runs the same command (tpu.hosts processes in all).
        [*ssh, f"cd bigmodel && {exports}{train}"],
    ]


def main(args: argparse.Namespace) -> int:
    """Print the commands, or run them one after another with --submit."""
    tpu = tpu_slice(args.accelerator)
    cmds = commands(name=args.name, zone=args.zone, accelerator=args.accelerator, config=args.config,
                    workdir=args.workdir, overrides=args.overrides, project=args.project, env=parse_env(args.env))
    print(f"# {tpu.accelerator}: {tpu.chips} chips on {tpu.hosts} worker(s), one `bigmodel train` process each")
    for cmd in cmds:
        print_command(cmd)
        if args.submit:
            code = subprocess.run(cmd).returncode
            if code:
                print(f"bigmodel launch tpu-vm: the command above failed with exit status {code}")
                return code
    return 0
