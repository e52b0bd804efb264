"""Short-row training benchmark (issue 16), the data and the PyTorch + PEFT side
of `tests/reference/bench_short_rows.sh`.

    python bench_short_rows.py --write FILE [--rows 96]
        writes FILE: ROWS deterministic prompt/completion rows (JSON Lines, a
        row kind `wgtune train --data` reads), made from fixed word lists with
        a fixed seed: about 8 words of prompt and 4 to 6 words of completion,
        about 16 tokens of text per row in the SmolLM2 tokenizer before the
        chat template.

    python bench_short_rows.py --torch MODEL FILE [--batch-size 8] [--epochs 2]
                               [--log-every 2] [--threads 2] [--lr 2e-4] [--seed 42]
        trains PEFT LoRA (r 8, alpha 16, q_proj+v_proj, dropout 0; AdamW
        lr 2e-4, cosine, clip 1.0 as wgtune's defaults; fp32; CPU) on the rows
        of FILE, tokenized as wgtune does by default, and prints the rates.

Tokenization, as wgtune's `--chat-template auto` on a model with a chat
template: the prompt is the user turn, the completion the assistant turn; the
prompt part (the template up to and including the generation prompt) and the
rest (the completion and its end-of-turn markup) are tokenized separately, the
first as the tokenizer adds special tokens, the second without, and the loss
is on the second part only (labels -100 on the prompt). `bench_short_rows.sh`
checks the totals against `wgtune data`.

Batches: the rows shuffled per epoch with a fixed seed, BATCH rows per step,
padded to the batch's longest row (right padding, attention mask 0 and label
-100 on the padding), as transformers' DataCollatorForSeq2Seq does.

Counting, the same as wgtune's metrics.jsonl: `tokens` is every non-pad input
token of the batch (prompt and completion), `target_tokens` the tokens the
loss is computed on (the completion tokens). The rates are over the steps
since the last logged step (a log every LOG_EVERY steps and at step 1 and the
last step, as wgtune logs), and the reported rate is the mean over the logged
intervals after the first one (which holds the first step's warm-up); the
median of the same intervals is printed too (steadier on a shared machine).
"""
import argparse
import json
import math
import os
import random
import sys
import time

SUBJECTS = [
    "the old sailor", "my little sister", "the village baker", "a tired farmer",
    "the young doctor", "our new teacher", "the quiet painter", "a busy merchant",
    "the brave captain", "my best friend", "the city mayor", "a clever student",
]
VERBS = ["find", "cook", "carry", "paint", "fix", "sell", "hide", "build", "clean", "read"]
OBJECTS = [
    "a red boat", "the wooden chair", "some fresh bread", "an old map", "the broken clock",
    "a small garden", "the silver key", "a warm blanket", "the long letter", "a green lamp",
]
PLACES = ["at the harbor", "in the kitchen", "near the river", "on the hill", "by the market", "in the barn"]
TIMES = ["this morning", "last night", "on Sunday", "before dinner", "at noon", "after the storm"]
REASONS = [
    "because it was needed", "for the winter fair", "to help a neighbor", "as a gift",
    "before the rain came", "for the long trip",
]


def make_rows(n, seed=16):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        s, v, o = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)
        p, t, r = rng.choice(PLACES), rng.choice(TIMES), rng.choice(REASONS)
        prompt = f"Why did {s} {v} {o}?"
        done = "fixed" if v == "fix" else {"find": "found", "carry": "carried", "sell": "sold",
                                          "hide": "hid", "build": "built", "read": "read"}.get(v, v + "ed")
        completion = rng.choice([f"{done.capitalize()} it {r}.", f"It was {r}.", f"{t.capitalize()}, {p}."])
        rows.append({"prompt": prompt, "completion": completion})
    return rows


def write(path, n):
    with open(path, "w") as f:
        for row in make_rows(n):
            f.write(json.dumps(row) + "\n")


def encode(tok, prompt, completion):
    user = [{"role": "user", "content": prompt}]
    pt = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    ft = tok.apply_chat_template(user + [{"role": "assistant", "content": completion}], tokenize=False)
    if not ft.startswith(pt):
        sys.exit("the chat template does not render the prompt part as a prefix of the full row")
    a = tok(pt, add_special_tokens=True)["input_ids"]
    b = tok(ft[len(pt):], add_special_tokens=False)["input_ids"]
    if tok.eos_token_id is not None and tok.eos_token_id not in b:
        b = b + [tok.eos_token_id]
    return a + b, [-100] * len(a) + b


def run_torch(a):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(a.model)
    rows = [json.loads(l) for l in open(a.data) if l.strip()]
    ex = [encode(tok, r["prompt"], r["completion"]) for r in rows]
    n_tok = sum(len(i) for i, _ in ex)
    n_tgt = sum(sum(1 for x in l if x != -100) for _, l in ex)
    lens = sorted(len(i) for i, _ in ex)
    print(f"  torch data: {len(ex)} rows, tokens {n_tok} (min {lens[0]}, p50 {lens[len(lens) // 2]}, "
          f"max {lens[-1]}), targets {n_tgt}", flush=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="eager")
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                          task_type="CAUSAL_LM")
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    per_epoch = math.ceil(len(ex) / a.batch_size)
    total = per_epoch * a.epochs
    sched = get_cosine_schedule_with_warmup(opt, 0, total)

    def batch(idx):
        t = max(len(ex[i][0]) for i in idx)
        ids = torch.full((len(idx), t), pad, dtype=torch.long)
        lab = torch.full((len(idx), t), -100, dtype=torch.long)
        att = torch.zeros((len(idx), t), dtype=torch.long)
        for k, i in enumerate(idx):
            x, y = ex[i]
            ids[k, : len(x)] = torch.tensor(x)
            lab[k, : len(y)] = torch.tensor(y)
            att[k, : len(x)] = 1
        return ids, lab, att

    rates, trates = [], []
    step, tok_acc, tgt_acc, padded = 0, 0, 0, 0
    t_start = t_log = time.perf_counter()
    for epoch in range(a.epochs):
        order = list(range(len(ex)))
        random.Random(a.seed * 1000 + epoch).shuffle(order)
        for b0 in range(0, len(order), a.batch_size):
            idx = order[b0 : b0 + a.batch_size]
            ids, lab, att = batch(idx)
            # HF shifts the labels inside the loss: the mean over the label
            # positions != -100 after the shift, i.e. the completion tokens.
            loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tok_acc += int(att.sum())
            tgt_acc += int((lab[:, 1:] != -100).sum())
            padded += ids.numel()
            if step % a.log_every == 0 or step == total or step == 1:
                lv = loss.item()
                now = time.perf_counter()
                dt = now - t_log
                rates.append(tok_acc / dt)
                trates.append(tgt_acc / dt)
                print(f"  torch step {step}/{total}  loss {lv:.4f}  tokens_per_s {rates[-1]:.1f}  "
                      f"target_tokens_per_s {trates[-1]:.1f}  elapsed_s {now - t_start:.1f}", flush=True)
                tok_acc = tgt_acc = 0
                t_log = now
    tail = rates[1:] or rates
    ttail = trates[1:] or trates
    print(f"  torch padded tokens run: {padded} for {n_tok * a.epochs} real "
          f"({100.0 * n_tok * a.epochs / padded:.0f}% real)")
    med = sorted(tail)[len(tail) // 2] if len(tail) % 2 else sum(sorted(tail)[len(tail) // 2 - 1 : len(tail) // 2 + 1]) / 2
    print(f"TORCH_RESULT tokens_per_s {sum(tail) / len(tail):.2f} target_tokens_per_s "
          f"{sum(ttail) / len(ttail):.2f} steps {total} elapsed_s {time.perf_counter() - t_start:.1f} "
          f"threads {a.threads} median_tokens_per_s {med:.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", metavar="FILE")
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--torch", nargs=2, metavar=("MODEL", "FILE"))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args()
    if not a.write and not a.torch:
        ap.error("give --write FILE and/or --torch MODEL FILE")
    if a.write:
        write(a.write, a.rows)
    if a.torch:
        a.model, a.data = a.torch
        run_torch(a)


if __name__ == "__main__":
    main()
