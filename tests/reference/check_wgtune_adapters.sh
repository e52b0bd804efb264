#!/usr/bin/env bash
# Load the adapters wgtune writes (tests/train_parity.rs saves them after its
# 10-step runs) with PEFT's PeftModel.from_pretrained and record PEFT's loss
# on the step batch in tests/reference/data/<model>/peft/<case>/wgtune_check.json.
# train_parity then requires wgtune's own loss to match that record.
# Usage: bash tests/reference/check_wgtune_adapters.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
# The referee venv ($WGTUNE_REFENV or the default), built when missing.
py=$(tests/reference/setup-env.sh | tail -n 1)/bin/python
# Write the adapters (the records may not exist yet, hence the env var).
WGTUNE_WRITE_ADAPTERS_ONLY=1 cargo test --quiet --test train_parity adapters_match
adapters=target/tmp/wgtune-adapters
for model in ${WGTUNE_CHECK_MODELS:-tiny-llama tiny-gpt2 tiny-mistral tiny-qwen2 tiny-qwen3 tiny-gemma3}; do
  for case in ${WGTUNE_CHECK_CASES:-lora_qv lora_all prompt prefix prefix_proj prompt_text}; do
    "$py" tests/reference/generate.py --check-adapter "$adapters/$model/$case" --model "$model" --case "$case" \
      --json "tests/reference/data/$model/peft/$case/wgtune_check.json" | grep -E '"(peft_type|loss_on_step_batch)"'
  done
done
