#!/usr/bin/env bash
# Fetches llama.cpp's convert_hf_to_gguf.py (+ conversion/, gguf-py/) from the llama-cpp-python source
# distribution on PyPI (pip download, nothing is built) and unpacks only those into
# ~/.cache/wgtune-ref/llama-cpp-python/llama_cpp_python-$VERSION/vendor/llama.cpp (gguf_families.py's default).
set -euo pipefail
VERSION=${1:-0.3.36}
PY=${WGTUNE_REFENV:-$HOME/.cache/wgtune-ref/venv}/bin/python
DIR=$HOME/.cache/wgtune-ref/llama-cpp-python
mkdir -p "$DIR"
cd "$DIR"
if [ ! -f "llama_cpp_python-$VERSION.tar.gz" ]; then
  # --no-binary only for this package: its build dependencies may still come as wheels (only metadata is prepared)
  "$PY" -m pip download --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d .
fi
V="llama_cpp_python-$VERSION/vendor/llama.cpp"
tar xzf "llama_cpp_python-$VERSION.tar.gz" --wildcards "$V/convert_hf_to_gguf.py" "$V/conversion/*" "$V/gguf-py/*"
echo "$DIR/$V"
