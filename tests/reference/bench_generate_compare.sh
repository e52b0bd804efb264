#!/usr/bin/env bash
# Side by side, in one run: `wgtune bench generate` (greedy, no adapter)
# with the weights as stored and as f32, then transformers' CPU `generate`
# (tests/reference/bench_generate_torch.py) at the same prompt and output
# lengths. Each runs in its own process.
#
# Usage: tests/reference/bench_generate_compare.sh MODEL [PROMPT] [NEW] [RUNS]
# Needs a built wgtune (target/release or target/debug, or $WGTUNE) and the
# reference venv (tests/reference/setup-env.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
model=$1
prompt=${2:-40}
new=${3:-64}
runs=${4:-3}
wgtune=${WGTUNE:-}
if [ -z "$wgtune" ]; then
  for c in "$here/../../target/release/wgtune" "$here/../../target/debug/wgtune"; do
    if [ -x "$c" ]; then wgtune=$c; break; fi
  done
fi
venv=$("$here/setup-env.sh" | tail -n 1)
for w in stored f32; do
  "$wgtune" bench generate --model "$model" --prompt-tokens "$prompt" --new-tokens "$new" --runs "$runs" --weights "$w"
done
"$venv/bin/python" "$here/bench_generate_torch.py" "$model" --prompt-tokens "$prompt" --new-tokens "$new" --runs "$runs"
