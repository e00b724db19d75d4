#!/usr/bin/env bash
# `bigmodel plan --target` for the shipped GPU configs on 8 H100s and Llama-2-7B / MoE configs on TPU
# slices, compiled on this host with the targets' own compilers (no accelerator needed):
#   bash benchmarks/plan_targets.sh [OUT.jsonl]   (default benchmarks/plan-targets-YYYY-MM-DD.jsonl)
# Needs the gpu-compile and tpu extras (pip install -e '.[gpu-compile,tpu]'). One JSON line per plan.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/plan-targets-$(date +%F).jsonl}"
llama=(--config experiments/gpt_tiny.py --model gpt:llama2_7b --config.model.dtype=bfloat16
       --config.model.remat=full --config.data.seq_len=2048 --config.train.batch_size=16)
run() {  # NAME ARGS...: one plan, its JSON record tagged with NAME
  local name="$1"; shift
  echo "== $name" >&2
  if record=$(bigmodel plan --json "$@"); then
    python -c "import json, sys; r = json.loads(sys.argv[2]); r['name'] = sys.argv[1]; print(json.dumps(r))" \
      "$name" "$record" >> "$out"
  else
    echo "{\"name\": \"$name\", \"error\": \"see stderr\"}" >> "$out"
  fi
}
for size in 124m 350m 1.3b; do
  run "gpt_gpu:$size h100x8 fsdp=8" --config "experiments/gpt_gpu.py:$size" --target h100x8 --mesh fsdp=8
done
run "gpt_gpu:1.3b h100x1" --config experiments/gpt_gpu.py:1.3b --target h100x1
run "gpt_gpu:1.3b remat=none batch=256 h100x8" --config experiments/gpt_gpu.py:1.3b --target h100x8 --mesh fsdp=8 \
  --config.model.remat=none --config.train.batch_size=256
run "gpt_gpu:1.3b h100x16 data=2,fsdp=8" --config experiments/gpt_gpu.py:1.3b --target h100x16 --mesh data=2,fsdp=8 \
  --config.train.batch_size=32
run "llama2_7b tpu-v5p-32 fsdp=16" "${llama[@]}" --target tpu-v5p-32 --mesh fsdp=16
run "llama2_7b tpu-v5p-32 data=16" "${llama[@]}" --target tpu-v5p-32 --mesh data=16
run "gpt_tiny:moe tpu-v5e-16 expert=4,data=4" --config experiments/gpt_tiny.py:moe --target tpu-v5e-16 \
  --mesh data=4,expert=4
run "llama2_7b tpu-v5p-32x2 data=2,fsdp=16" "${llama[@]}" --target tpu-v5p-32x2 --mesh data=2,fsdp=16 \
  --config.train.batch_size=32
echo "records appended to $out" >&2
