"""Reference logits of transformers on a real model folder, for the
`real_model` tests (outside CI; run by hand).

Usage: python tests/real/smollm2_reference.py MODEL_DIR OUT.safetensors
Run it with the reference venv (tests/reference/setup-env.sh); MODEL_DIR is
e.g. the folder tests/reference/get-smollm2.sh prints (docs/reference-data.md).
Writes, per prompt i: p{i}.ids (T,) i32 and p{i}.logits (T, V) f32 (float32
model, no padding), plus chat.ids and chat.greedy (greedy generate, 24 new
tokens, of a chat-templated question).
"""
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "In 1969, 3 astronauts flew 384400 km to the Moon. 🚀",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
]

def main():
    model_dir, out = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    tensors = {}
    with torch.no_grad():
        for i, p in enumerate(PROMPTS):
            ids = tok(p, return_tensors="pt").input_ids
            logits = model(ids).logits[0]
            tensors[f"p{i}.ids"] = ids[0].to(torch.int32)
            tensors[f"p{i}.logits"] = logits.float().contiguous()
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        gen = model.generate(ids, do_sample=False, max_new_tokens=24)
        tensors["chat.ids"] = ids[0].to(torch.int32)
        tensors["chat.greedy"] = gen[0, ids.shape[1]:].to(torch.int32).contiguous()
        print("greedy:", repr(tok.decode(gen[0, ids.shape[1]:])))
    save_file(tensors, out)

if __name__ == "__main__":
    main()
