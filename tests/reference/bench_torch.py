"""PyTorch + PEFT side of `tests/reference/bench_compare.sh`: training
steps on SmolLM2-135M-Instruct at the same shape as `wgtune bench train`
(random token ids, loss at every position, AdamW, fp32 on CPU), printing
tokens/s (batch x seq-len tokens per step, as wgtune counts them) and the
process's peak RSS. Methods as `wgtune bench train --methods` names them:
lora (r 8, alpha 16, q_proj+v_proj), lora-all (all-linear), prompt (20
virtual tokens), prefix and prefix-proj (20 virtual tokens, with the MLP
reparameterization).

Usage: python bench_torch.py MODEL [--method lora] [--batch-size 4] [--seq-len 128] [--steps 3] [--threads N]
MODEL is a Hugging Face folder or a .gguf file (loaded with transformers'
GGUF support, which dequantizes to fp32: the same numbers wgtune stores).
"""
import argparse
import os
import resource
import time

import torch
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.model.endswith(".gguf"):
        d, f = os.path.split(os.path.abspath(a.model))
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32)
    cfg = {
        "lora": lambda: LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0
        ),
        "lora-all": lambda: LoraConfig(
            r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0
        ),
        "prompt": lambda: PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=20),
        "prefix": lambda: PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=20),
        "prefix-proj": lambda: PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=20, prefix_projection=True,
            encoder_hidden_size=model.config.hidden_size,
        ),
    }[a.method]()
    model = get_peft_model(model, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (a.batch_size, a.seq_len))

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()
        return out.loss.item()

    t0 = time.time()
    first = step()
    warm = time.time() - t0
    t1 = time.time()
    for _ in range(a.steps):
        step()
    secs = (time.time() - t1) / a.steps
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"  torch+peft {a.method} {a.batch_size * a.seq_len / secs:8.1f} tok/s  {secs:.2f} s/step  "
        f"(first step {warm:.1f} s, loss {first:.3f}), {a.threads} threads, fp32, peak RSS {rss:.0f} MiB"
    )


if __name__ == "__main__":
    main()
