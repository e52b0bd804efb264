"""llama.cpp's own GGUF reader (the `gguf` package, gguf-py) on what
`wgtune export` writes, for every tiny family: the GGUF LoRA of the q,v and
all-linear adapters (f32, and q8_0 for lora_all), and the q,v adapter merged
into the llama.cpp-converted base GGUF (f16). Commits what gguf-py lists —
metadata, tensor names, shapes (innermost first, as GGUF stores them) and
types — to tests/reference/data/gguf/lora_lists.json; tests/export.rs checks
wgtune's exports against it without Python.

Usage (from the repository root, reference venv):
    cargo build --release
    python tests/reference/gguf_lora_lists.py [--wgtune target/release/wgtune]
"""
import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import gguf

FAMILIES = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3", "tiny-gpt2"]
DATA = Path("tests/reference/data")
KEYS = ["general.architecture", "general.type", "adapter.type", "adapter.lora.alpha"]


def listing(path):
    r = gguf.GGUFReader(path)
    fields = {f.name: f for f in r.fields.values()}
    meta = {}
    for k in KEYS:
        if k in fields:
            v = fields[k].contents()
            meta[k] = v
    return {
        "meta": meta,
        "n_meta": len([k for k in fields if not k.startswith("GGUF.")]),
        "tensors": [[t.name, [int(x) for x in t.shape], t.tensor_type.name] for t in r.tensors],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wgtune", default="target/release/wgtune")
    a = ap.parse_args()
    out = {"gguf_py": gguf.__version__ if hasattr(gguf, "__version__") else "unknown", "exports": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for fam in FAMILIES:
            base_gguf = DATA / "gguf" / "families" / f"{fam}.gguf"
            jobs = [("lora_qv", "f32", False), ("lora_all", "f32", False), ("lora_all", "q8_0", False), ("lora_qv", "f16", True)]
            for case, dtype, merge in jobs:
                f = Path(tmp) / f"{fam}-{case}-{dtype}-{merge}.gguf"
                cmd = [a.wgtune, "export", "--adapter", str(DATA / fam / "peft" / case / "initial"),
                       "--out", str(f), "--dtype", dtype, "--no-modelfile"]
                cmd += ["--merge", "--format", "gguf", "--base", str(base_gguf)] if merge else ["--base", str(DATA / fam)]
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                key = f"{fam}/{case}/{'merged-' if merge else ''}{dtype}"
                out["exports"][key] = listing(f)
                print(key, len(out["exports"][key]["tensors"]), "tensors")
    (DATA / "gguf" / "lora_lists.json").write_text(json.dumps(out, indent=1) + "\n")


main()
