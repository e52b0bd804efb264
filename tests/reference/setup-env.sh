#!/usr/bin/env bash
# Build the Python referee: the exact PyTorch + transformers + PEFT stack that
# tests/reference/data was made with. generate.py and gguf_generate.py refuse
# any other versions (unless WGTUNE_REF_ANY_VERSION=1).
#
# Usage: tests/reference/setup-env.sh [VENV]
#   VENV defaults to $WGTUNE_REFENV, else $HOME/.cache/wgtune-ref/venv.
#   The venv's path is the last line printed, so callers can do
#   py=$(tests/reference/setup-env.sh | tail -n 1)/bin/python
#
# Needs python3 with the venv module (Debian: python3-venv) and access to PyPI.
# The first run takes a few minutes and several GiB (torch from PyPI brings
# its CUDA libraries); later runs only check the venv and print its path.
set -euo pipefail

venv=${1:-${WGTUNE_REFENV:-$HOME/.cache/wgtune-ref/venv}}

# One list: what gets installed is what is checked.
pins=(
  torch==2.15.0
  transformers==5.24.0
  peft==0.21.2
  safetensors==0.8.0
  gguf==0.19.0
  tokenizers==0.23.3
  # gguf_generate.py also checks these two.
  numpy==2.4.6
  sentencepiece==0.2.3
  protobuf==7.36.2
  # Needed at import time by transformers/peft paths the scripts use; their
  # versions do not change the numbers.
  accelerate
  psutil
)

have_pins() {
  [ -x "$venv/bin/python" ] || return 1
  "$venv/bin/python" - "${pins[@]}" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
for spec in sys.argv[1:]:
    name, _, want = spec.partition("==")
    got = version(name)  # raises when missing
    if want and got != want:
        sys.exit(1)
PY
}

if ! have_pins; then
  # A dangling link (a venv shared from another machine) would stop `venv`.
  if [ -L "$venv" ] && [ ! -e "$venv" ]; then rm -f "$venv"; fi
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}"
  have_pins || { echo "setup-env.sh: $venv does not have ${pins[*]} after installing" >&2; exit 1; }
fi
# Importing is the real check (a half-installed wheel passes the metadata test).
"$venv/bin/python" -c 'import torch, transformers, peft, gguf, tokenizers, safetensors, sentencepiece
from importlib.metadata import version as v
print("reference env:", ", ".join(f"{n} {v(n)}" for n in ("torch", "transformers", "peft", "tokenizers", "safetensors", "gguf")))' >&2
echo "$venv"
