#!/usr/bin/env python3
"""PEFT reference for LoRA on some layers only (`layers_to_transform`, wgtune's `--num-layers`), with
generate.py's machinery (its part_c: initial adapter, one step's loss and gradients, 10 AdamW steps).

    ~/.cache/wgtune-ref/venv/bin/python tests/reference/layers_generate.py

Writes data/<model>/peft/<case>/ (the files part_c writes) for:
  tiny-llama  lora_layers  q_proj, v_proj on the top layer, layers_to_transform as a list ([1])
  tiny-gpt2   lora_layers  c_attn on the top layer, layers_to_transform as an int (1), PEFT's other spelling
No layers_pattern: PEFT's default rule takes the first number after `<name>.<name>.` of the module path
(`model.layers.1.self_attn.q_proj`, `transformer.h.1.attn.c_attn`), which is the layer index for both.
Nothing else under data/ is touched.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate as G  # noqa: E402

CASE = "lora_layers"
LAYERS = {"tiny-llama": [1], "tiny-gpt2": 1}


def main():
    os.chdir(G.ROOT)
    G.check_versions()
    G.setup_torch()
    base_config = G.peft_config

    for mi, (name, layers) in enumerate(LAYERS.items()):
        arch = "gpt2" if name == "tiny-gpt2" else "llama"

        def peft_config(method, arch, model_dir_rel, layers=layers):
            assert method == CASE, method
            cfg = base_config("lora_qv", arch, model_dir_rel)
            cfg.layers_to_transform = layers
            return cfg

        G.peft_config = peft_config
        G.PEFT_METHODS = [CASE]
        model_dir = G.DATA_REL / name
        ref = json.loads((model_dir / "reference.json").read_text())
        i = ref["ids"]
        ids = {"bos": i["bos"], "eos": i["eos"], "pad": i["pad"], "gen_eos": i["generation_eos"]}
        tok = G.load_tok(model_dir)
        G.part_c(name, model_dir, tok, ids, arch, G.SEED + 5000 + 10 * mi)
        saved = json.loads((model_dir / "peft" / CASE / "initial" / "adapter_config.json").read_text())
        assert saved["layers_to_transform"] == layers, saved["layers_to_transform"]
        grads = json.loads((model_dir / "peft" / CASE / "step.json").read_text())["trainable"]
        want = layers if isinstance(layers, list) else [layers]
        # Only the chosen layers carry LoRA tensors.
        for n in grads:
            assert any(f".{l}." in n for l in want), n
        print(f"  {name}: {len(grads)} LoRA tensors on layers {want}", flush=True)


if __name__ == "__main__":
    main()
