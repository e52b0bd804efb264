#!/usr/bin/env python3
"""transformers + PEFT reference for the real SmolLM2-135M-Instruct GGUF (outside CI).

    ~/.cache/wgtune-ref/venv/bin/python tests/reference/smollm2_gguf_reference.py [GGUF] [--out DIR]

GGUF defaults to $WGTUNE_SMOLLM2_GGUF, else the file get-smollm2.sh keeps,
~/.cache/wgtune-ref/gguf/SmolLM2-135M-Instruct.Q4_1.gguf. DIR defaults to
$WGTUNE_SMOLLM2_REF, else ~/.cache/wgtune-ref/smollm2-gguf. Nothing it writes
is committed; tests/real_model_gguf.rs (ignored tests) reads it.

The model is transformers' own GGUF loading,
AutoModelForCausalLM.from_pretrained(dir, gguf_file=name), which dequantizes
every tensor to float32 (gguf-py) and undoes llama.cpp's q/k row permutation.
transformers 5 marks such a model as quantized, which PEFT cannot train, so the
weights are copied unchanged into a plain LlamaForCausalLM (tied embeddings)
with eager attention. The config is transformers' GGUF config as read (e.g.
rms_norm_eps is float32(1e-5) = 9.999999747378752e-06, as GGUF stores it).

Written to DIR:
  reference.safetensors
    input_ids, labels   I32 [2, 64]  two text rows, no padding, labels = ids
    logits              F32 [2, 64, 49152]  forward of the base model
    <name>.grad         F32  the LoRA gradients of the initial adapter on that
                        batch (PEFT names without `.default`)
  lora_initial/         the initial LoRA adapter, PeftModel.save_pretrained
                        (r 8, alpha 16, q_proj + v_proj, dropout 0; A is PEFT's
                        kaiming init, B redrawn as N(0, 0.02^2) so the adapter
                        is not a no-op); target_modules sorted
  reference.json        versions, source file (name, size), config, the loss,
                        the training settings, loss_before_step[5] and
                        grad_norm_before_clip[5], loss_after_training

Training: torch.optim.AdamW(lr 1e-3, betas (0.9, 0.999), eps 1e-8,
weight_decay 0.01, one param group), constant lr, clip_grad_norm_(1.0), 5 steps
on the same batch. Deterministic: CPU, float32, one thread, fixed seeds,
deterministic algorithms. About a minute on one core.
"""

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loader has its own progress bar

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

SEED = 1234
STEPS = 5
B, T = 2, 64
LR = 1e-3
VERSIONS = {"torch": "2.15.0", "transformers": "5.24.0", "peft": "0.21.2"}
DEFAULT_GGUF = Path.home() / ".cache/wgtune-ref/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path.home() / ".cache/wgtune-ref/smollm2-gguf"

# Two plain English texts without digits (transformers' GGUF tokenizer does not
# split digits as SmolLM2 does; the tests use these ids, not a tokenizer).
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


def setup_torch():
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def check_versions():
    got = {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
           "peft": peft.__version__}
    if got != VERSIONS and os.environ.get("WGTUNE_REF_ANY_VERSION") != "1":
        sys.exit(f"version mismatch: want {VERSIONS}, have {got} (set WGTUNE_REF_ANY_VERSION=1 to override)")
    return got


def plain_copy(model) -> LlamaForCausalLM:
    """The GGUF-loaded weights in an ordinary (trainable) LlamaForCausalLM."""
    fields = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        fields.pop(key, None)
    cfg = LlamaConfig(**fields)
    cfg._attn_implementation = "eager"
    plain = LlamaForCausalLM(cfg)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if plain.config.tie_word_embeddings:
        missing = [m for m in missing if m != "lm_head.weight"]
    assert not missing and not unexpected, (missing, unexpected)
    plain.tie_weights()
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
    for n, p in model.state_dict().items():
        assert torch.equal(plain.state_dict()[n], p), n
    assert plain.config._attn_implementation == "eager"
    return plain.to(torch.float32).eval()


def batch_loss(model, ids, labels):
    return model(input_ids=ids, labels=labels).loss


def lora_reference(model, name, input_ids, labels, out, tensors, tag=""):
    """PEFT LoRA r 8, alpha 16, dropout 0 on q_proj + v_proj (A: PEFT's kaiming init after
    torch.manual_seed(SEED + 1); B redrawn N(0, 0.02^2) from a Generator seeded SEED + 2), saved to
    out/lora_initial (target_modules sorted, base = `name`); the first step's gradients into
    `tensors` (before clipping); STEPS AdamW steps (lr LR, betas (0.9, 0.999), eps 1e-8, weight decay
    0.01, clip 1.0) on the same batch. Returns (init_dir, losses, grad norms, loss after)."""
    lcfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, lora_dropout=0.0,
                      target_modules=["q_proj", "v_proj"], bias="none")
    torch.manual_seed(SEED + 1)
    pm = get_peft_model(model, lcfg)
    pm.eval()
    g = torch.Generator().manual_seed(SEED + 2)
    trainable = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    with torch.no_grad():
        for n, p in trainable:
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    init_dir = out / "lora_initial"
    pm.save_pretrained(init_dir)
    p = init_dir / "adapter_config.json"
    acfg = json.loads(p.read_text())
    acfg["target_modules"] = sorted(acfg["target_modules"])
    acfg["base_model_name_or_path"] = name
    p.write_text(json.dumps(acfg, indent=2, sort_keys=True))

    params = [p for _, p in trainable]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    losses, norms = [], []
    for step in range(STEPS):
        opt.zero_grad()
        l = batch_loss(pm, input_ids, labels)
        l.backward()
        if step == 0:
            for n, p in trainable:
                # clone: clip_grad_norm_ below scales .grad in place
                tensors[n.replace(".default", "") + ".grad"] = p.grad.detach().float().clone()
        norms.append(torch.nn.utils.clip_grad_norm_(params, 1.0).item())
        losses.append(l.item())
        opt.step()
        print(f"{tag}step {step}: loss {losses[-1]:.7f}, grad norm {norms[-1]:.7f}", flush=True)
    with torch.no_grad():
        after = batch_loss(pm, input_ids, labels).item()
    print(f"{tag}after {STEPS} steps: {after:.7f}", flush=True)
    return init_dir, losses, norms, after


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", nargs="?", type=Path,
                    default=Path(os.environ.get("WGTUNE_SMOLLM2_GGUF", DEFAULT_GGUF)))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("WGTUNE_SMOLLM2_REF", DEFAULT_OUT)))
    args = ap.parse_args()
    versions = check_versions()
    setup_torch()
    gguf_path = args.gguf.resolve()
    src_dir, name = str(gguf_path.parent), gguf_path.name
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32,
                                                  attn_implementation="eager").eval()
    model = plain_copy(loaded)
    cfg = model.config

    rows = []
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False).input_ids
        assert len(ids) >= T, (len(ids), text)
        rows.append(ids[:T])
    input_ids = torch.tensor(rows, dtype=torch.long)
    labels = input_ids.clone()

    tensors = {"input_ids": input_ids.to(torch.int32).contiguous(),
               "labels": labels.to(torch.int32).contiguous()}
    with torch.no_grad():
        # The GGUF-loaded model and the plain copy agree exactly.
        a = loaded(input_ids=input_ids).logits
        res = model(input_ids=input_ids, labels=labels)
        assert torch.equal(a, res.logits), float((a - res.logits).abs().max())
        logits, loss = res.logits, res.loss.item()
        # transformers' loss = hand-computed shifted cross-entropy (in f64).
        lp = torch.log_softmax(logits[:, :-1].double(), -1)
        nll = -lp.gather(-1, labels[:, 1:, None])[..., 0]
        assert abs(nll.mean().item() - loss) < 1e-5, (nll.mean().item(), loss)
    tensors["logits"] = logits.float().contiguous()
    n_targets = int((labels[:, 1:] != -100).sum())
    print(f"base loss {loss:.7f} over {n_targets} targets", flush=True)
    del loaded

    # LoRA: initial adapter, one step's gradients, 5 AdamW steps.
    init_dir, losses, norms, after = lora_reference(model, name, input_ids, labels, out, tensors)

    # The saved initial adapter reloads to the first step's loss.
    with torch.no_grad():
        base2 = plain_copy(AutoModelForCausalLM.from_pretrained(
            src_dir, gguf_file=name, dtype=torch.float32, attn_implementation="eager"))
        rl = batch_loss(PeftModel.from_pretrained(base2, init_dir).eval(), input_ids, labels).item()
    assert abs(rl - losses[0]) < 1e-5, (rl, losses[0])

    save_file(tensors, out / "reference.safetensors", metadata={"format": "pt"})
    meta = {
        "source": name,
        "source_bytes": gguf_path.stat().st_size,
        "versions": versions,
        "loader": "AutoModelForCausalLM.from_pretrained(dir, gguf_file=name), copied into LlamaForCausalLM (eager)",
        "config": {k: cfg.to_dict().get(k) for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size", "rms_norm_eps", "rope_parameters", "tie_word_embeddings")},
        "batch": {"b": B, "t": T, "texts": TEXTS, "targets": n_targets},
        "loss": loss,
        "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0,
                 "init": "A kaiming (PEFT), B ~ N(0, 0.02^2)"},
        "train": {"optimizer": "torch.optim.AdamW", "lr": LR, "betas": [0.9, 0.999], "eps": 1e-8,
                  "weight_decay": 0.01, "schedule": "constant", "clip_grad_norm": 1.0, "steps": STEPS,
                  "loss_before_step": losses, "grad_norm_before_clip": norms, "loss_after_training": after},
    }
    (out / "reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    print("wrote", out, sorted(q.name for q in out.iterdir()))


if __name__ == "__main__":
    main()
