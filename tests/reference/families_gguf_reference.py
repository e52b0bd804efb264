#!/usr/bin/env python3
"""transformers + PEFT reference for real Gemma 3 / Qwen3 / Llama 3.x GGUF files (outside CI).

    ~/.cache/wgtune-ref/venv/bin/python families_gguf_reference.py GGUF [GGUF ...] [--out-root DIR]

Modeled on wgtune's tests/reference/smollm2_gguf_reference.py. For each GGUF:

  * transformers' own GGUF loading, AutoModelForCausalLM.from_pretrained(dir, gguf_file=name,
    dtype=float32, attn_implementation="eager") (dequantizes every tensor with gguf-py, undoes
    llama.cpp's q/k permutation for llama, subtracts the +1 from gemma norm weights). transformers 5
    marks that model quantized, which PEFT cannot train, so the weights are copied unchanged into a
    plain <Family>ForCausalLM built from the same config (eager attention); the two agree exactly.
  * a fixed batch: 2 rows x 64 tokens of plain English (no digits), tokenized by transformers' GGUF
    tokenizer with its default special tokens (BOS when the file asks for it), labels = ids.
  * logits of positions 0..7 and of the last position of each row; the per-row mean shifted
    cross-entropy; the batch loss (transformers' own).
  * greedy decoding: a one-turn chat prompt rendered with the file's chat template (or, when the file
    has none, the family's documented turn format, recorded as such), 20 new tokens with
    model.generate(do_sample=False, use_cache=True); checked against an uncached argmax re-run.
  * LoRA r 8, alpha 16, dropout 0 on q_proj + v_proj (A: PEFT kaiming init with torch seed SEED+1,
    B redrawn N(0, 0.02^2) from a Generator seeded SEED+2, in named_parameters order); the first
    backward's gradients; then 5 AdamW steps (lr 1e-3, betas (.9,.999), eps 1e-8, wd .01, clip 1.0).

Written to OUT_ROOT/<gguf stem>/ (OUT_ROOT defaults to ~/.cache/wgtune-ref):
  reference.safetensors  input_ids, labels I32 [2,64]; logits_head F32 [2,8,V]; logits_last F32 [2,V];
                         row_loss F32 [2]; prompt_ids, generated_ids I32; <peft name>.grad F32
  reference.json         versions, source (name, bytes, sha256), the loaded config (full), batch,
                         losses, chat prompt (rendered text, template origin), generation, LoRA and
                         training settings and results, notes
  lora_initial/          PeftModel.save_pretrained of the initial adapter (target_modules sorted)
A file transformers refuses gets OUT_ROOT/<stem>/error.json with the exact error instead.
"""

import argparse
import hashlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import peft
import torch
import transformers
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

# The LoRA run is SmolLM2's (same seeds, steps and optimizer).
from smollm2_gguf_reference import lora_reference

SEED = 1234
STEPS = 5
B, T = 2, 64
HEAD = 8
NEW_TOKENS = 20
LR = 1e-3
DEFAULT_ROOT = Path.home() / ".cache/wgtune-ref"

TEXTS = [
    "The water cycle describes how water moves between the oceans, the air and the land. "
    "Heat from the sun makes water evaporate from seas and lakes; the vapour rises, cools and "
    "condenses into clouds. When the droplets grow heavy enough they fall as rain or snow, "
    "which runs off into rivers or soaks into the ground, and eventually the water returns "
    "to the sea, where the cycle begins again.",
    "Once upon a time, in a small village at the edge of a dark forest, there lived an old "
    "clockmaker who never let anyone into his workshop. The children of the village told "
    "stories about the strange sounds that came from behind his door at night: ticking, "
    "humming, and sometimes a voice that seemed to sing. One winter evening, a curious girl "
    "named Mira decided to find out what he was hiding.",
]
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]

# Used only when the GGUF carries no tokenizer.chat_template (recorded in reference.json).
FALLBACK_TEMPLATES = {
    # google/gemma-3 chat template (its text-only part; jinja drops a template's trailing newline,
    # hence the quoted '<start_of_turn>model\n').
    "gemma3": (
        "{{ bos_token }}"
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
        "{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
        "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
        "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
        "{{ message['content'] | trim }}"
        "{{ '<end_of_turn>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
    ),
    "qwen3": "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    "llama": "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
             "(m['content'] | trim) + '<|eot_id|>' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
}


def setup_torch():
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for blk in iter(lambda: f.read(1 << 20), b""):
            h.update(blk)
    return h.hexdigest()


def plain_copy(model):
    """The GGUF-loaded weights in an ordinary (trainable) model of the same class."""
    fields = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        fields.pop(key, None)
    cfg = type(model.config)(**fields)
    cfg._attn_implementation = "eager"
    plain = type(model)(cfg)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if plain.config.tie_word_embeddings:
        missing = [m for m in missing if m != "lm_head.weight"]
        plain.tie_weights()
        assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
    assert not missing and not unexpected, (missing, unexpected)
    psd = plain.state_dict()
    for n, p in model.state_dict().items():
        assert torch.equal(psd[n], p), n
    assert plain.config._attn_implementation == "eager"
    return plain.to(torch.float32).eval()


def row_losses(logits, labels):
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    nll = -lp.gather(-1, labels[:, 1:, None])[..., 0]
    return nll.mean(1), nll.mean()


def run_one(gguf_path: Path, out: Path, versions):
    src_dir, name = str(gguf_path.parent), gguf_path.name
    out.mkdir(parents=True, exist_ok=True)
    (out / "error.json").unlink(missing_ok=True)
    t0 = time.time()
    notes = []
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32,
                                                  attn_implementation="eager").eval()
    print(f"[{name}] loaded {type(loaded).__name__} in {time.time() - t0:.0f}s", flush=True)
    print(loaded.config, flush=True)
    model = plain_copy(loaded)
    cfg = model.config
    arch = cfg.model_type

    # --- batch
    rows = []
    for text in TEXTS:
        ids = tok(text).input_ids  # tokenizer defaults: BOS when the GGUF asks for it
        assert len(ids) >= T, (len(ids), text)
        rows.append(ids[:T])
    input_ids = torch.tensor(rows, dtype=torch.long)
    labels = input_ids.clone()
    tensors = {"input_ids": input_ids.to(torch.int32).contiguous(),
               "labels": labels.to(torch.int32).contiguous()}
    with torch.no_grad():
        a = loaded(input_ids=input_ids).logits
        res = model(input_ids=input_ids, labels=labels)
        assert torch.equal(a, res.logits), float((a - res.logits).abs().max())
        logits, loss = res.logits, res.loss.item()
        rl, mean = row_losses(logits, labels)
        # f32 cross-entropy over a 262k vocab: agree to ~1e-5 relative
        assert abs(mean.item() - loss) < 1e-4 * max(1.0, abs(loss)), (mean.item(), loss)
    tensors["logits_head"] = logits[:, :HEAD].float().contiguous()
    tensors["logits_last"] = logits[:, -1].float().contiguous()
    tensors["row_loss"] = rl.float().contiguous()
    print(f"[{name}] loss {loss:.7f} rows {rl.tolist()}", flush=True)
    del a, res, logits

    # --- chat prompt + greedy generation
    gguf_template = tok.chat_template
    if gguf_template:
        template, template_origin = gguf_template, "tokenizer.chat_template of the GGUF"
    else:
        template = FALLBACK_TEMPLATES["gemma3" if arch.startswith("gemma3") else arch]
        template_origin = (f"GGUF has no tokenizer.chat_template; the {arch} family's published chat template "
                           "(text-only part) written into this script")
        notes.append(template_origin)
    rendered = tok.apply_chat_template(CHAT, chat_template=template, tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(rendered, add_special_tokens=False).input_ids  # the template writes BOS itself
    p = torch.tensor([prompt_ids])
    with torch.no_grad():
        gen = model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=NEW_TOKENS, do_sample=False,
                             use_cache=True, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None
                             else tok.eos_token_id)
        new_ids = gen[0, len(prompt_ids):].tolist()
        # uncached argmax re-run of the same sequence
        full = model(input_ids=gen).logits[0]
        greedy_uncached = full[len(prompt_ids) - 1:-1].argmax(-1).tolist()
    n = len(new_ids)
    uncached_agrees = greedy_uncached[:n] == new_ids
    if not uncached_agrees:
        notes.append("KV-cached greedy differs from an uncached argmax re-run (see generation)")
    tensors["prompt_ids"] = torch.tensor(prompt_ids, dtype=torch.int32)
    tensors["generated_ids"] = torch.tensor(new_ids, dtype=torch.int32)
    gen_text = tok.decode(new_ids)
    print(f"[{name}] rendered {rendered!r}\n[{name}] generated {new_ids} {gen_text!r} "
          f"(uncached agrees: {uncached_agrees})", flush=True)

    # --- LoRA
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    init_dir, losses, norms, after = lora_reference(model, name, input_ids, labels, out, tensors,
                                                    tag=f"[{name}] ")

    # The saved initial adapter reloads to the first step's loss (on a fresh plain copy).
    base2 = plain_copy(loaded)
    for k, v in base2.state_dict().items():
        assert torch.equal(v, base_sd[k]), k
    with torch.no_grad():
        rl2 = PeftModel.from_pretrained(base2, init_dir).eval()(input_ids=input_ids, labels=labels).loss.item()
    assert abs(rl2 - losses[0]) < 1e-5, (rl2, losses[0])

    save_file(tensors, out / "reference.safetensors", metadata={"format": "pt"})
    full_cfg = cfg.to_dict()
    full_cfg.pop("quantization_config", None)
    meta = {
        "source": name,
        "source_bytes": gguf_path.stat().st_size,
        "source_sha256": sha256(gguf_path),
        "versions": versions,
        "loader": f"AutoModelForCausalLM.from_pretrained(dir, gguf_file=name), copied into {type(model).__name__} (eager)",
        "config": full_cfg,
        "tokenizer": {"class": type(tok).__name__, "len": len(tok), "bos": [tok.bos_token, tok.bos_token_id],
                      "eos": [tok.eos_token, tok.eos_token_id], "pad": [tok.pad_token, tok.pad_token_id],
                      "add_bos_token": getattr(tok, "add_bos_token", None),
                      "gguf_has_chat_template": bool(gguf_template)},
        "batch": {"b": B, "t": T, "texts": TEXTS, "ids": rows, "targets": int(labels[:, 1:].numel()),
                  "tokenized": "tok(text).input_ids (tokenizer defaults, BOS if the GGUF adds it), first 64"},
        "loss": loss,
        "row_loss": rl.tolist(),
        "logits_stored": {"logits_head": f"positions 0..{HEAD - 1} of each row", "logits_last": "position 63 of each row"},
        "chat": {"messages": CHAT, "template_origin": template_origin, "template": template,
                 "rendered": rendered, "prompt_ids": prompt_ids},
        "generation": {"method": "model.generate(do_sample=False, use_cache=True, max_new_tokens=20)",
                       "new_ids": new_ids, "text": gen_text, "uncached_argmax": greedy_uncached,
                       "uncached_agrees": uncached_agrees},
        "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0,
                 "init": "A kaiming (PEFT, torch.manual_seed(SEED+1)), B ~ N(0, 0.02^2) (Generator SEED+2)",
                 "seed": SEED},
        "train": {"optimizer": "torch.optim.AdamW", "lr": LR, "betas": [0.9, 0.999], "eps": 1e-8,
                  "weight_decay": 0.01, "schedule": "constant", "clip_grad_norm": 1.0, "steps": STEPS,
                  "loss_before_step": losses, "grad_norm_before_clip": norms, "loss_after_training": after},
        "notes": notes,
        "seconds": time.time() - t0,
    }
    (out / "reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"[{name}] wrote {out} {sorted(q.name for q in out.iterdir())} in {time.time() - t0:.0f}s", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", nargs="+", type=Path)
    ap.add_argument("--out-root", type=Path, default=DEFAULT_ROOT)
    args = ap.parse_args()
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    setup_torch()
    rc = 0
    for g in args.gguf:
        g = g.resolve()
        out = args.out_root / g.name.removesuffix(".gguf")
        try:
            run_one(g, out, versions)
        except Exception as e:  # record the exact error, go on with the next file
            rc = 1
            out.mkdir(parents=True, exist_ok=True)
            err = {"source": g.name, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            (out / "error.json").write_text(json.dumps(err, indent=2) + "\n")
            print(f"[{g.name}] FAILED: {err['error']}", file=sys.stderr, flush=True)
    sys.exit(rc)


if __name__ == "__main__":
    main()
