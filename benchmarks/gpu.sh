#!/usr/bin/env bash
# GPU throughput and MFU of the GPT train step, one JSON line per size and sequence length:
#   bash benchmarks/gpu.sh [OUT.jsonl]   (default benchmarks/gpu-YYYY-MM-DD.jsonl)
# Needs an NVIDIA GPU; installs the project's 'gpu' extra when the installed JAX sees none.
# Each benchmark compiles once and times 10 steps after 2 of warm-up (`bigmodel bench train`).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/gpu-$(date +%F).jsonl}"
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "benchmarks/gpu.sh: no NVIDIA GPU on this machine (nvidia-smi finds none); run it on a GPU host" >&2
  exit 2
fi
if ! python -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
  pip install --quiet -e '.[gpu]'
fi
python -c "import jax; print(jax.devices())" >&2
for variant in 124m 124m,2048 350m 350m,2048 1.3b 1.3b,2048; do
  echo "== experiments/gpt_gpu.py:$variant" >&2
  bigmodel bench train --config "experiments/gpt_gpu.py:$variant" --steps 10 | tee -a "$out"
done
echo "figures appended to $out" >&2
