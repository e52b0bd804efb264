#!/usr/bin/env bash
# Issue 16 ("Speed"), short rows side by side in one run: LoRA q,v (r 8,
# alpha 16) training on ROWS short prompt/completion rows (about 17 tokens of
# text each in the SmolLM2 tokenizer; about 49 with SmolLM2's chat template and
# default system prompt), batch 8, lr 2e-4, for EPOCHS epochs:
#   1. wgtune train (padding to the batch's row bucket),
#   2. wgtune train --packing --max-seq-len PACK_LEN,
#   3. PyTorch + PEFT (fp32, CPU, THREADS threads; bench_short_rows.py --torch),
#      padding each batch to its longest row, as DataCollatorForSeq2Seq does.
#
# Counting, the same on all sides: tokens = every non-pad input token of the
# step's rows (prompt, chat markup and completion; never padding),
# target_tokens = the tokens the loss is computed on (the completion and its
# end-of-turn markup, as wgtune's default --chat-template auto trains). wgtune
# reads them from OUT/metrics.jsonl (tokens_per_s, target_tokens_per_s: rates
# over the steps since the previous logged step); the PyTorch side computes
# the same over the same log steps. The reported rate is the mean over the
# logged intervals after the first one (the first holds step 1: pipeline
# builds on wgtune's side, first-call overheads on PyTorch's). The script
# checks that both sides see the same token and target totals (`wgtune data`).
# "wall" is end-to-end tokens/s: all tokens over the whole training loop,
# first step included (wgtune: the last line's elapsed_s).
#
# Usage: tests/reference/bench_short_rows.sh MODEL
#   MODEL: a Hugging Face folder (f32), e.g. SmolLM2-135M-Instruct.
# Environment: EPOCHS (2) BATCH (8) ROWS (96) LOG_EVERY (2) PACK_LEN (256)
#   THREADS (2, torch.set_num_threads) WGTUNE (the binary; default
#   target/release or target/debug) SKIP_TORCH=1 (wgtune only).
# Needs the reference venv (tests/reference/setup-env.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
model=${1:?usage: bench_short_rows.sh MODEL}
epochs=${EPOCHS:-2}
batch=${BATCH:-8}
rows=${ROWS:-96}
log_every=${LOG_EVERY:-2}
pack_len=${PACK_LEN:-256}
threads=${THREADS:-2}
wgtune=${WGTUNE:-}
if [ -z "$wgtune" ]; then
  for c in "$here/../../target/release/wgtune" "$here/../../target/debug/wgtune"; do
    if [ -x "$c" ]; then wgtune=$c; break; fi
  done
fi
[ -n "$wgtune" ] || { echo "no wgtune binary: cargo build, or set WGTUNE" >&2; exit 1; }
venv=$("$here/setup-env.sh" | tail -n 1)
py=$venv/bin/python
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
data=$tmp/short_rows.jsonl
"$py" "$here/bench_short_rows.py" --write "$data" --rows "$rows"

"$wgtune" data --model "$model" --data "$data" >"$tmp/data.txt" 2>&1
sed -n '/^examples:/,/^targets per example:/p' "$tmp/data.txt"
w_tok=$(sed -n 's/^tokens per example:.*total \([0-9]*\).*/\1/p' "$tmp/data.txt")
w_tgt=$(sed -n 's/^targets per example:.*total \([0-9]*\).*/\1/p' "$tmp/data.txt")

# mean of tokens_per_s and target_tokens_per_s over the metrics lines after
# the first; then end-to-end tokens/s; the number of steps; loop seconds;
# the median tokens_per_s of the same lines
summarize() {
  "$py" - "$1" <<'EOF'
import json, sys
L = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_s"' in l]
t = L[1:] or L
m = lambda k: sum(r[k] for r in t) / len(t)
import statistics
med = statistics.median(r['tokens_per_s'] for r in t)
print(f"{m('tokens_per_s'):.2f} {m('target_tokens_per_s'):.2f} {L[-1]['tokens'] / L[-1]['elapsed_s']:.2f} {L[-1]['step']} {L[-1]['elapsed_s']:.1f} {med:.2f}")
EOF
}

common=(train --method lora --model "$model" --data "$data" --batch-size "$batch" --epochs "$epochs"
  --lora-targets q_proj,v_proj --lora-r 8 --lora-alpha 16 --lr 2e-4 --log-every "$log_every"
  --no-progress --overwrite)
echo "== wgtune ($wgtune)"
"$wgtune" "${common[@]}" --out "$tmp/w" 2>"$tmp/w.log" || { cat "$tmp/w.log" >&2; exit 1; }
grep -E '^step|^done' "$tmp/w.log" || true
read -r w_rate w_trate w_wall w_steps w_secs w_med < <(summarize "$tmp/w/metrics.jsonl")
echo "== wgtune --packing --max-seq-len $pack_len"
"$wgtune" "${common[@]}" --packing --max-seq-len "$pack_len" --out "$tmp/p" 2>"$tmp/p.log" || { cat "$tmp/p.log" >&2; exit 1; }
grep -E '^step|^done' "$tmp/p.log" || true
read -r p_rate p_trate p_wall p_steps p_secs p_med < <(summarize "$tmp/p/metrics.jsonl")

t_rate=; t_trate=; t_wall=; t_steps=; t_secs=; t_med=
if [ "${SKIP_TORCH:-0}" != 1 ]; then
  echo "== PyTorch + PEFT ($threads threads)"
  "$py" "$here/bench_short_rows.py" --torch "$model" "$data" --batch-size "$batch" --epochs "$epochs" \
    --log-every "$log_every" --threads "$threads" 2>"$tmp/t.err" | tee "$tmp/t.log" \
    || { cat "$tmp/t.err" >&2; exit 1; }
  t_tok=$(sed -n 's/.*torch data:.*tokens \([0-9]*\) .*/\1/p' "$tmp/t.log")
  t_tgt=$(sed -n 's/.*torch data:.*targets \([0-9]*\).*/\1/p' "$tmp/t.log")
  if [ "$t_tok" != "$w_tok" ] || [ "$t_tgt" != "$w_tgt" ]; then
    echo "MISMATCH: wgtune data counts $w_tok tokens / $w_tgt targets, the PyTorch side $t_tok / $t_tgt" >&2
    exit 1
  fi
  echo "token counts agree: $w_tok tokens, $w_tgt targets per epoch on both sides"
  read -r t_rate t_trate t_wall t_steps t_secs t_med < <(sed -n 's/^TORCH_RESULT tokens_per_s \([^ ]*\) target_tokens_per_s \([^ ]*\) steps \([^ ]*\) elapsed_s \([^ ]*\) threads [^ ]* median_tokens_per_s \([^ ]*\).*/\1 \2 - \3 \4 \5/p' "$tmp/t.log")
  t_wall=$("$py" -c "print(f'{$w_tok * $epochs / $t_secs:.2f}')")
fi

echo
echo "$rows rows, batch $batch, $epochs epochs, LoRA q,v r 8, lr 2e-4; tok/s, target/s: mean over logged intervals after the first (every $log_every steps), p50: their median; wall: all tokens / whole loop"
f='%-34s %6s %10s %12s %10s %8s %9s %10s %9s\n'
printf "$f" side steps tok/s target/s "wall tok/s" "loop s" "vs torch" "p50 tok/s" "p50 vs"
ratio() { [ -n "$2" ] && "$py" -c "print(f'{$1 / $2:.2f}x')" || echo -; }
printf "$f" "wgtune" "$w_steps" "$w_rate" "$w_trate" "$w_wall" "$w_secs" "$(ratio "$w_rate" "$t_rate")" "$w_med" "$(ratio "$w_med" "$t_med")"
printf "$f" "wgtune --packing (max $pack_len)" "$p_steps" "$p_rate" "$p_trate" "$p_wall" "$p_secs" "$(ratio "$p_rate" "$t_rate")" "$p_med" "$(ratio "$p_med" "$t_med")"
if [ -n "$t_rate" ]; then
  printf "$f" "PyTorch+PEFT fp32 CPU ${threads}t" "$t_steps" "$t_rate" "$t_trate" "$t_wall" "$t_secs" "1.00x" "$t_med" "1.00x"
fi
