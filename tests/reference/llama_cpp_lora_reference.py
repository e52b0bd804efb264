"""llama.cpp's side of the GGUF LoRA check (issue: `wgtune export`).

For a base GGUF and each exported GGUF LoRA (and no adapter), llama.cpp
(llama-cpp-python, built from source) greedily generates 32 tokens from a
fixed chat prompt and keeps the logits of every step. Writes, per case:
  OUT/<name>.json   prompt ids, greedy ids, per-step top-8 (id, logit) and
                    the top-1/top-2 margin (small; committed);
  CACHE/<name>.f32  the full logits, [32, vocab] little-endian f32 (for the
                    ignored test tests/real_model_gguf.rs::llama_cpp_lora_parity,
                    which compares wgtune's logits with them).

Usage (reference venv with llama-cpp-python; tests/reference/llama_cpp_lora.sh
runs the whole chain):
    python tests/reference/llama_cpp_lora_reference.py --base BASE.gguf \
        --lora qv=qv.gguf --lora all=all.gguf --tag f32 --out DIR --cache DIR
"""
import argparse
import json
from pathlib import Path

import llama_cpp
import numpy as np

PROMPT = "<|im_start|>user\nWhat do you like to do on a sunny day?<|im_end|>\n<|im_start|>assistant\n"
STEPS = 32


def run(base, lora, prompt):
    # An f32 KV cache (llama.cpp's default is f16), so that with an F32 base
    # the only arithmetic difference left is summation order.
    kw = dict(model_path=str(base), n_ctx=256, verbose=False, n_threads=2, seed=0, logits_all=True,
              type_k=0, type_v=0)
    if lora:
        kw["lora_path"] = str(lora)
    llm = llama_cpp.Llama(**kw)
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    llm.eval(ids)
    out, logits = [], []
    for _ in range(STEPS):
        lg = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        logits.append(lg)
        nxt = int(np.argmax(lg))
        out.append(nxt)
        llm.eval([nxt])
    text = llm.detokenize(out).decode(errors="replace")
    return ids, out, np.stack(logits), text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--lora", action="append", default=[], help="NAME=FILE.gguf")
    ap.add_argument("--merged", action="append", default=[], help="NAME=FILE.gguf, a merged model run alone")
    ap.add_argument("--tag", required=True, help="names the base in the output files")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cache", required=True)
    a = ap.parse_args()
    out, cache = Path(a.out), Path(a.cache)
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    cases = [("base", a.base, None)]
    cases += [(n, a.base, f) for n, f in (x.split("=", 1) for x in a.lora)]
    cases += [(n, f, None) for n, f in (x.split("=", 1) for x in a.merged)]
    for name, model, lora in cases:
        ids, greedy, logits, text = run(model, lora, PROMPT)
        top = []
        for lg in logits:
            o = np.argsort(lg)[::-1][:8]
            top.append([[int(i), float(lg[i])] for i in o])
        margins = [t[0][1] - t[1][1] for t in top]
        rec = {
            "model": Path(model).name,
            "lora": Path(lora).name if lora else None,
            "llama_cpp_python": llama_cpp.__version__,
            "prompt": PROMPT,
            "prompt_ids": ids,
            "greedy_ids": greedy,
            "text": text,
            "min_margin": min(margins),
            "margins": margins,
            "kv_cache": "f32",
            "top8": top,
        }
        stem = f"{a.tag}-{name}"
        (out / f"{stem}.json").write_text(json.dumps(rec) + "\n")
        logits.astype("<f4").tofile(cache / f"{stem}.f32")
        print(f"{stem}: {text!r} (min top-2 margin {min(margins):.3f})")


main()
