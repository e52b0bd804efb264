"""transformers side of `tests/reference/bench_generate_compare.sh`: greedy
`generate` on the CPU (fp32, KV cache) at the shape of `wgtune bench
generate`: random prompt ids, then exactly N new tokens (no stop token).

Prefill and decode are timed apart as wgtune reports them: prefill is a
`generate(max_new_tokens=1)` (the prompt's forward and the first token),
decode tok/s is (N - 1) / (time of N new tokens - time of 1). Each is the
median of --runs runs after one warm-up.

Usage: python bench_generate_torch.py MODEL [--prompt-tokens 40] [--new-tokens 64] [--runs 3] [--threads N]
MODEL is a Hugging Face folder or a .gguf file (dequantized to fp32 by
transformers' GGUF support).
"""
import argparse
import os
import resource
import statistics
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt-tokens", type=int, default=40)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.model.endswith(".gguf"):
        d, f = os.path.split(os.path.abspath(a.model))
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (1, a.prompt_tokens))
    mask = torch.ones_like(ids)

    def run(n):
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )
        assert out.shape[1] == a.prompt_tokens + n
        return time.perf_counter() - t

    run(a.new_tokens)  # warm-up
    first = statistics.median(run(1) for _ in range(a.runs))
    full = statistics.median(run(a.new_tokens) for _ in range(a.runs))
    decode = (a.new_tokens - 1) / (full - first)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"  transformers generate: prefill {a.prompt_tokens / first:7.1f} tok/s ({first:.3f} s)   "
        f"decode {decode:6.2f} tok/s ({1e3 / decode:.1f} ms/token), {a.threads} threads, fp32, "
        f"peak RSS {rss:.0f} MiB"
    )


if __name__ == "__main__":
    main()
