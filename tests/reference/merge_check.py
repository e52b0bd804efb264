"""`wgtune export --merge` against PEFT: for every tiny family and each LoRA
case (q,v and all-linear), merge the adapter with wgtune, load the merged
folder in transformers and compare its logits with PeftModel's (base +
adapter) on a fixed batch. Optionally the same for a real model and adapter
(--model DIR --adapter DIR).

Usage (from the repository root, with the reference venv):
    cargo build --release
    python tests/reference/merge_check.py [--wgtune target/release/wgtune]
        [--model SMOLLM2_F32_DIR --adapter ADAPTER_DIR] [--out FILE.json]
Prints one line per case and writes the numbers as JSON (stdout or --out).
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from peft import PeftModel
from transformers import AutoModelForCausalLM

FAMILIES = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3", "tiny-gpt2"]
DATA = Path("tests/reference/data")


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def check(wgtune, base, adapter, ids, label):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "merged"
        subprocess.run(
            [wgtune, "export", "--adapter", str(adapter), "--base", str(base), "--merge", "--out", str(out)],
            check=True, stdout=subprocess.DEVNULL,
        )
        merged = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
        got = logits(merged, ids)
    ref_base = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(ref_base, adapter).eval()
    want = logits(peft, ids)
    with peft.disable_adapter():
        off = logits(peft, ids)
    diff = (got - want).abs().max().item()
    effect = (want - off).abs().max().item()
    row = {"case": label, "max_abs_diff": diff, "adapter_effect": effect, "tokens": list(ids.shape)}
    # The narrowest dtype the checkpoint stores weights in (norms may be f32).
    dtypes = set()
    for shard in Path(base).glob("*.safetensors"):
        with safe_open(shard, framework="pt") as f:
            dtypes |= {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    dtype = {"BF16": "bfloat16", "F16": "float16"}.get(next((d for d in sorted(dtypes) if d != "F32"), "F32"), "float32")
    # PEFT's own merge_and_unload in the base's dtype: a merged folder keeps
    # that dtype, so the sum is rounded to it, and even in f32 a merged
    # W + s·B·A rounds differently from W·x + s·B·(A·x).
    native = AutoModelForCausalLM.from_pretrained(base, torch_dtype=getattr(torch, dtype)).eval()
    ref = PeftModel.from_pretrained(native, adapter).merge_and_unload().float()
    ref_logits = logits(ref, ids)
    row["dtype"] = dtype
    row["peft_merge_diff"] = (ref_logits - want).abs().max().item()
    row["ours_vs_peft_merge"] = (ref_logits - got).abs().max().item()
    print(f"{label}: {row}", file=sys.stderr)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wgtune", default="target/release/wgtune")
    ap.add_argument("--model")
    ap.add_argument("--adapter")
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for fam in FAMILIES:
        cfg = json.loads((DATA / fam / "config.json").read_text())
        ids = torch.randint(0, cfg["vocab_size"], (2, 11))
        for case in ["lora_qv", "lora_all"]:
            rows.append(check(a.wgtune, DATA / fam, DATA / fam / "peft" / case / "initial", ids, f"{fam}/{case}"))
    if a.model:
        ids = torch.randint(0, 49152, (1, 32))
        rows.append(check(a.wgtune, Path(a.model), Path(a.adapter), ids, f"{Path(a.model).name}+{Path(a.adapter).name}"))
    # Within 1e-4 of PeftModel (f32 bases), or no further from it than
    # PEFT's own merge in the same dtype (plus 10%).
    f32 = [r["max_abs_diff"] for r in rows if r["dtype"] == "float32"]
    ok = all(
        r["max_abs_diff"] <= (1e-4 if r["dtype"] == "float32" else 0) or r["max_abs_diff"] <= 1.1 * r["peft_merge_diff"]
        for r in rows
    )
    worst = max(f32)
    text = json.dumps({"tolerance_f32": 1e-4, "worst_f32": worst, "ok": ok, "cases": rows}, indent=1)
    if a.out:
        Path(a.out).write_text(text + "\n")
    else:
        print(text)
    sys.exit(0 if ok else 1)


main()
