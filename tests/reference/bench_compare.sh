#!/usr/bin/env bash
# Side by side, in one run: `wgtune bench train` on a GGUF with its weights
# as stored, the same model with --weights f32, and PyTorch + PEFT (fp32,
# tests/reference/bench_torch.py) at the same batch and shape. Each runs in
# its own process, so each peak RSS is its own.
#
# Usage: tests/reference/bench_compare.sh MODEL.gguf [BATCH] [SEQ] [STEPS]
# Needs a built wgtune (target/release or target/debug, or $WGTUNE) and the
# reference venv (tests/reference/setup-env.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
model=$1
b=${2:-4}
t=${3:-128}
steps=${4:-3}
wgtune=${WGTUNE:-}
if [ -z "$wgtune" ]; then
  for c in "$here/../../target/release/wgtune" "$here/../../target/debug/wgtune"; do
    if [ -x "$c" ]; then wgtune=$c; break; fi
  done
fi
venv=$("$here/setup-env.sh" | tail -n 1)
for w in stored f32; do
  "$wgtune" bench train --model "$model" --methods lora --batch-size "$b" --seq-len "$t" --steps "$steps" --weights "$w"
done
"$venv/bin/python" "$here/bench_torch.py" "$model" --batch-size "$b" --seq-len "$t" --steps "$steps"
