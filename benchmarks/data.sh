#!/usr/bin/env bash
# Token-store figures, one JSON line each:  bash benchmarks/data.sh [OUT.jsonl] [WORK_DIR]
#   prepare: MB/s of text with 1 and with 2 processes (this Python's standard library as jsonl, 8 files,
#            tokenized with a GPT-2-style byte-level BPE tokenizer.json of 32,768 ids trained on it);
#   bench data: tokens/s of one process reading 64 × 1024 batches from the store.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/data-$(date +%F).jsonl}"
work="${2:-$(mktemp -d)}"
mkdir -p "$work"
python - "$work" <<'EOF'
import glob, json, os, sys, sysconfig
from bigmodel.data import tokenizers
work = sys.argv[1]
files = sorted(f for f in glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True)
               if "site-packages" not in f)
docs = [open(f, encoding="utf-8", errors="replace").read() for f in files]
os.makedirs(f"{work}/corpus", exist_ok=True)
for i in range(8):
    with open(f"{work}/corpus/part{i}.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[i::8])
if not os.path.exists(f"{work}/bpe/tokenizer.json"):
    tokenizers.train_bpe(docs, 32768, f"{work}/bpe/tokenizer.json")
EOF
for n in 1 2; do
  rm -rf "$work/store$n"
  bigmodel prepare --source "$work/corpus" --format jsonl --tokenizer "hf:$work/bpe/tokenizer.json" \
    --out "$work/store$n" --processes "$n" --quiet | tail -1 | tee -a "$out"
done
bigmodel bench data --config experiments/gpt2_124m.py --config.data.sources="('$work/store2',)" \
  --config.train.batch_size=64 --config.eval.batch_size=8 --config.eval.sets="()" --batches 200 | tee -a "$out"
