#!/usr/bin/env python3
"""Extra Gemma 3 reference past the sliding window (outside CI).

    ~/.cache/wgtune-ref/venv/bin/python gemma3_swa_reference.py [GGUF] [--out DIR]

One row of 640 tokens (the two batch texts of families_gguf_reference.py repeated, tokenized by
transformers' GGUF tokenizer, BOS first) through transformers' GGUF-loaded Gemma3ForCausalLM (eager),
whose config has sliding_window 512 on 5 of every 6 layers (layer_types). Stores the logits at a few
positions before and after the window edge, the mean shifted cross-entropy, and the same numbers with
every layer forced to full attention, so an implementation that ignores the window (or gets its edge
off by one) shows up. transformers masks key j for query i when i - j >= sliding_window (llama.cpp's
LLAMA_SWA_TYPE_STANDARD is the same rule).

Written to DIR (default ~/.cache/wgtune-ref/<gguf stem>/): swa_reference.safetensors
(input_ids I32 [1,640]; positions I32 [P]; logits F32 [P,V]; logits_full_attention F32 [P,V] (window widened past T, rope unchanged);
loss, loss_full_attention F32 [1]) and swa_reference.json.
"""
import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from families_gguf_reference import TEXTS, plain_copy, row_losses  # noqa: E402

T = 640
POSITIONS = [0, 255, 510, 511, 512, 513, 520, 600, 639]
DEFAULT_GGUF = Path.home() / ".cache/wgtune-ref/gguf/gemma-3-270m-q4_k_m.gguf"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf", nargs="?", type=Path, default=DEFAULT_GGUF)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.manual_seed(1234)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    g = args.gguf.resolve()
    out = args.out or Path.home() / ".cache/wgtune-ref" / g.name.removesuffix(".gguf")
    out.mkdir(parents=True, exist_ok=True)
    d, n = str(g.parent), g.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=n)
    loaded = AutoModelForCausalLM.from_pretrained(d, gguf_file=n, dtype=torch.float32, attn_implementation="eager")
    model = plain_copy(loaded)
    del loaded
    cfg = model.config
    assert cfg.sliding_window < T, cfg.sliding_window
    text = " ".join(TEXTS * 8)
    ids = tok(text).input_ids
    assert len(ids) >= T, len(ids)
    input_ids = torch.tensor([ids[:T]])
    pos = torch.tensor(POSITIONS)
    res = {}
    window = cfg.sliding_window
    for label, w in (("", window), ("_full_attention", 1 << 20)):
        # "full attention" here: the same model (sliding layers keep their local rope base) with the
        # window widened past the sequence, so only the mask changes
        cfg.sliding_window = w
        for layer in model.model.layers:
            if layer.self_attn.sliding_window is not None:
                layer.self_attn.sliding_window = w
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits
        _, loss = row_losses(logits, input_ids)
        res["logits" + label] = logits[0, pos].float().contiguous()
        res["loss" + label] = torch.tensor([loss.item()], dtype=torch.float32)
        print(f"loss{label}: {loss.item():.7f}", flush=True)
    cfg.sliding_window = window
    for layer in model.model.layers:
        if layer.self_attn.sliding_window is not None:
            layer.self_attn.sliding_window = window
    diff = (res["logits"] - res["logits_full_attention"]).abs().amax(-1)
    print("max |logit diff| windowed vs full, per position:", dict(zip(POSITIONS, diff.tolist())), flush=True)
    tensors = {"input_ids": input_ids.to(torch.int32), "positions": pos.to(torch.int32), **res}
    save_file(tensors, out / "swa_reference.safetensors", metadata={"format": "pt"})
    meta = {"source": n, "t": T, "positions": POSITIONS, "text": "' '.join(TEXTS * 8), tok(text).input_ids[:640]",
            "sliding_window": cfg.sliding_window, "layer_types": list(cfg.layer_types),
            "loss": res["loss"].item(), "loss_full_attention": res["loss_full_attention"].item(),
            "max_abs_logit_diff_windowed_vs_full": dict(zip(map(str, POSITIONS), diff.tolist())),
            "mask_rule": "key j masked for query i when i - j >= sliding_window (and j > i)"}
    (out / "swa_reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    print("wrote", out / "swa_reference.safetensors", flush=True)


if __name__ == "__main__":
    main()
