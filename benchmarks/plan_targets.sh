#!/usr/bin/env bash
# `bigmodel plan --target` for the shipped GPU configs on 8 H100s and Llama-2-7B / MoE configs on TPU
# slices, compiled on this host with the targets' own compilers (no accelerator needed):
#   bash benchmarks/plan_targets.sh [OUT.jsonl]   (default benchmarks/plan-targets-YYYY-MM-DD.jsonl)
# Needs the gpu-compile and tpu extras (pip install -e '.[gpu-compile,tpu]'). One JSON line per plan, then a
# Markdown table of them all on stdout.
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
run "gpt_gpu:1.3b tpu-v5p-32x2 data=2,fsdp=16" --config experiments/gpt_gpu.py:1.3b --target tpu-v5p-32x2 \
  --mesh data=2,fsdp=16 --config.train.batch_size=32 --config.eval.batch_size=32
echo "records appended to $out; the table:" >&2
python - "$out" <<'PY'
import json, sys

print("| plan | fits | peak / device | compile | attention | all-gather | reduce-scatter | all-reduce | all-to-all "
      "| collective-permute | FLOPs / step | roofline step, MFU bound |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "error" in r:
        print(f"| {r['name']} | did not compile: {r['error']} |")
        continue
    gib = lambda b: f"{b / 2**30:.1f} GiB"
    peak = gib(r["compiled"]["peak"]) if r.get("compiled") else "out of memory"
    c = r.get("collectives")
    cell = lambda k: f"{c[k]['count']} ({gib(c[k]['bytes'])})" if c else ""
    roof = r.get("roofline")
    bound = f"{roof['step_s_lower_bound'] * 1e3:.0f} ms, {roof['mfu_at_bound']:.0%}" if roof else ""
    flops = f"{r['flops_per_step']:.2e}" if "flops_per_step" in r else ""
    compile_s = f"{r['compile_s']:.0f} s" if "compile_s" in r else ""
    print(f"| {r['name']} | {'yes' if r['fits'] else 'no'} | {peak} | {compile_s} | {r.get('attention', '')} "
          f"| {cell('all-gather')} | {cell('reduce-scatter')} | {cell('all-reduce')} | {cell('all-to-all')} "
          f"| {cell('collective-permute')} | {flops} | {bound} |")
PY
