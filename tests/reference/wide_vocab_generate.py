#!/usr/bin/env python3
"""Wide-vocabulary PEFT reference data for wgtune: tiny llama models with vocabularies of 151,936
(Qwen2.5's) and 262,144 (Gemma 3's), whose weights are a formula, so nothing big is committed.

Run from anywhere (the script changes to the repository root):

    ~/.cache/wgtune-ref/venv/bin/python tests/reference/wide_vocab_generate.py   # about 1 min, 1 thread

It rewrites tests/reference/data/wide_vocab/ deterministically (CPU, float32, one thread, fixed seeds,
eager attention), with the stack generate.py pins (torch 2.15.0, transformers 5.24.0, peft 0.21.2).

The weights. Every tensor's element i (row-major flat index) is, in float32:

    h = fmix32(fmix32(i) ^ seed)           murmur3's 32-bit finalizer, wrapping u32 arithmetic
    u = float32(h >> 8) * 2^-24 - 0.5      exact: a multiple of 2^-24 in [-0.5, 0.5)
    w = u * scale                          (norm weights: 1 + u * scale)

with seed = FNV-1a 32 of the tensor's name (UTF-8) and scale from weights.json. Each step is one IEEE
f32 operation (the last is the only rounding), so numpy and Rust get bit-identical weights; weights.json
records per tensor a checksum of the bit patterns for the Rust side to prove it.

Outputs (see "Wide vocabularies" in tests/reference/README.md):
  data/wide_vocab/<model>/            wide-151936, wide-262144
      config.json                     as transformers writes it (llama, tied, hidden 64, 2 layers)
      weights.json                    the formula, and per tensor {shape, seed, scale, offset, checksum}
      peft/<case>/                    lora (q_proj, v_proj), prompt (8 virtual tokens), prefix (8, no MLP)
          initial/                    the adapter as PEFT saves it
          step.safetensors            batch input_ids/labels/attention_mask I32 [4, 128] + every .grad
          step.json                   {loss, targets, trainable}
          train.json                  3 AdamW steps (as generate.py's 10): loss_before_step, grad_norm_before_clip
"""

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import (  # noqa: E402  (the conventions of the other PEFT cases)
    check_versions, fix_adapter_config, f32, i32, peft_name, setup_torch, state_of, trainable, write_json,
)
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT_REL = Path("tests/reference/data/wide_vocab")
SEED = 4321
META = {"format": "pt"}
VOCABS = [151936, 262144]
B, T = 4, 128
CASES = ["lora", "prompt", "prefix"]  # append only: seeds use the index
TRAIN_STEPS = 3
FORMULA = ("h = fmix32(fmix32(i) ^ seed) (murmur3 finalizer, wrapping u32); u = f32(h >> 8) * 2^-24 - 0.5; "
           "w = u * scale, or 1 + u * scale for norm weights (offset 1); seed = FNV-1a 32 of the name")
CHECKSUM = "sum over elements of the f32 bit pattern as u64, mod 2^64"


def fmix32(x):
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x85EBCA6B)
    x ^= x >> np.uint32(13)
    x *= np.uint32(0xC2B2AE35)
    x ^= x >> np.uint32(16)
    return x


def fnv1a32(name):
    h = 0x811C9DC5
    for b in name.encode():
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def formula(name, shape, scale, offset):
    n = int(np.prod(shape))
    h = fmix32(fmix32(np.arange(n, dtype=np.uint32)) ^ np.uint32(fnv1a32(name)))
    u = (h >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24) - np.float32(0.5)
    w = u * np.float32(scale)
    if offset:
        w = np.float32(offset) + w
    assert w.dtype == np.float32
    return w.reshape(shape)


def checksum(w):
    return int(w.view(np.uint32).astype(np.uint64).sum(dtype=np.uint64))


def make_config(vocab):
    return LlamaConfig(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=96, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=True, attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def scale_of(name):
    if name.endswith("norm.weight"):
        return 0.25, 1.0
    if name == "model.embed_tokens.weight":
        return 0.5, 0.0
    return 0.25, 0.0


def build_model(vocab, model_dir_rel):
    cfg = make_config(vocab)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    sd = model.state_dict()
    table, state = {}, {}
    for name, p in model.named_parameters():  # tied: lm_head.weight is embed_tokens.weight, not listed
        scale, offset = scale_of(name)
        w = formula(name, tuple(p.shape), scale, offset)
        state[name] = torch.from_numpy(w.copy())
        table[name] = {"shape": list(p.shape), "seed": fnv1a32(name), "scale": scale, "offset": offset,
                       "checksum": checksum(w), "first": [float(x) for x in w.reshape(-1)[:3]]}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "not tied"
    assert set(table) == {k for k in sd if k != "lm_head.weight"}
    model.name_or_path = str(model_dir_rel)
    model.config.name_or_path = str(model_dir_rel)
    return model, cfg, table


def make_batch(vocab, seed):
    """4 x 128 ids spread over the whole vocabulary; rows 0 and 3 have label[0] != -100 (it counts
    under prompt tuning), row 1 masks a 40-token prompt, row 2 is 97 long (right-padded with PAD 0,
    mask 0, label -100), row 3 masks every 7th label."""
    g = np.random.default_rng(seed)
    ids = g.integers(0, vocab, size=(B, T)).astype(np.int64)
    top = [vocab - 1, vocab - 2, vocab - 3, 65535, 65536, 65537, 131071, 131072, vocab // 2, vocab - 100]
    for r in range(B):
        pos = g.choice(np.arange(1, 97), size=len(top), replace=False)
        ids[r, pos] = top
    labels = ids.copy()
    mask = np.ones((B, T), dtype=np.int64)
    labels[1, :40] = -100
    ids[2, 97:], labels[2, 97:], mask[2, 97:] = 0, -100, 0
    labels[2, 0] = -100
    labels[3, ::7] = -100
    labels[3, 0] = ids[3, 0]
    assert (ids >= 65536).sum() > B * T // 2 and (ids == vocab - 1).sum() >= B
    return torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(mask)


def peft_config(case):
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, TaskType

    if case == "lora":
        return LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, lora_dropout=0.0,
                          target_modules=["q_proj", "v_proj"], bias="none")
    if case == "prompt":
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=8,
                                  prompt_tuning_init=PromptTuningInit.RANDOM)
    if case == "prefix":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=8, prefix_projection=False)
    raise ValueError(case)


def lr_for(case):
    return 5e-3 if case == "lora" else 1e-2


def hand_loss(logits, labels, nv):
    """Mean shifted NLL in f64; with nv virtual tokens in front (prompt tuning) logits[:, nv-1+t]
    predicts labels[:, t], label[0] included."""
    if nv:
        lg, tg = logits[:, nv - 1:-1], labels
    else:
        lg, tg = logits[:, :-1], labels[:, 1:]
    lp = torch.log_softmax(lg.double(), -1)
    keep = tg != -100
    nll = -lp.gather(-1, tg.clamp(min=0)[..., None])[..., 0]
    return nll[keep].mean().item(), int(keep.sum())


def run_model(vocab, vi):
    from peft import get_peft_model, PeftModel

    name = f"wide-{vocab}"
    model_dir = OUT_REL / name
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
    base, cfg, table = build_model(vocab, model_dir)
    cfg.save_pretrained(model_dir)
    write_json(model_dir / "weights.json", {"formula": FORMULA, "checksum": CHECKSUM, "tensors": table})
    input_ids, labels, mask = make_batch(vocab, SEED + vi)
    for ci, case in enumerate(CASES):
        d = model_dir / "peft" / case
        d.mkdir(parents=True)
        base, _, _ = build_model(vocab, model_dir)
        pcfg = peft_config(case)
        torch.manual_seed(SEED + 10 * vi + ci)
        model = get_peft_model(base, pcfg)
        model.eval()
        g = torch.Generator().manual_seed(SEED + 100 + 10 * vi + ci)
        with torch.no_grad():
            for n, p in trainable(model):
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
                elif n.endswith("embedding.weight"):  # prompt and prefix: N(0, 0.1^2)
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        model.save_pretrained(d / "initial")
        fix_adapter_config(d / "initial")

        model.zero_grad()
        out = model(input_ids=input_ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        nv = pcfg.num_virtual_tokens if case == "prompt" else 0
        hl, n_targets = hand_loss(out.logits.detach(), labels, nv)
        step_loss = out.loss.item()
        assert abs(hl - step_loss) < 1e-5, (case, hl, step_loss)
        del out
        step = {"input_ids": i32(input_ids), "labels": i32(labels), "attention_mask": i32(mask)}
        for n, p in trainable(model):
            assert p.grad is not None and bool((p.grad != 0).any()), n
            step[peft_name(n) + ".grad"] = f32(p.grad)
        save_file(step, d / "step.safetensors", metadata=META)
        write_json(d / "step.json", {
            "loss": step_loss, "targets": n_targets,
            "trainable": {peft_name(n): list(p.shape) for n, p in trainable(model)},
        })

        with torch.no_grad():
            reloaded = PeftModel.from_pretrained(build_model(vocab, model_dir)[0], d / "initial").eval()
            rl = reloaded(input_ids=input_ids, attention_mask=mask, labels=labels).loss.item()
        assert abs(rl - step_loss) < 1e-5, (case, rl, step_loss)
        del reloaded

        params = [p for _, p in trainable(model)]
        opt = torch.optim.AdamW(params, lr=lr_for(case), betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
        losses, norms = [], []
        for _ in range(TRAIN_STEPS):
            opt.zero_grad()
            lo = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            lo.backward()
            norms.append(torch.nn.utils.clip_grad_norm_(params, 1.0).item())
            losses.append(lo.item())
            opt.step()
        with torch.no_grad():
            final_loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.item()
        write_json(d / "train.json", {
            "optimizer": "torch.optim.AdamW", "lr": lr_for(case), "betas": [0.9, 0.999], "eps": 1e-8,
            "weight_decay": 0.01, "schedule": "constant", "clip_grad_norm": 1.0, "steps": TRAIN_STEPS,
            "batch": "step.safetensors", "loss_before_step": losses, "grad_norm_before_clip": norms,
            "loss_after_training": final_loss,
        })
        print(f"  {name} {case}: loss {step_loss:.5f} ({n_targets} targets), after {TRAIN_STEPS} steps "
              f"{final_loss:.5f}", flush=True)


def main():
    check_versions()
    os.chdir(ROOT)
    setup_torch()
    for vi, vocab in enumerate(VOCABS):
        run_model(vocab, vi)


if __name__ == "__main__":
    main()
