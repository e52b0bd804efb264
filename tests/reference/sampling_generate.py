#!/usr/bin/env python3
"""Sampling reference for wgtune's logits filters (src/model/generate.rs `process_logits`).

Run from anywhere (the script changes to the repository root):

    ~/.cache/wgtune-ref/venv/bin/python tests/reference/sampling_generate.py

It rewrites tests/reference/data/sampling.json deterministically: one fixed logits vector, the
token ids already seen (prompt + output, with repeats), and per case the options and what
transformers' own processors make of the logits, chained in the order GenerationMixin's
_get_logits_processor builds them for sampling: RepetitionPenaltyLogitsProcessor, then the
warpers TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper
(min_tokens_to_keep=1). `scores` are the filtered logits (null where a filter set -inf),
`probs` their softmax. Versions: transformers 5.24.0, torch 2.15.0 (float32 on the CPU).
"""

import json
import os
from pathlib import Path

import torch
import transformers
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

os.chdir(Path(__file__).resolve().parents[2])

LOGITS = [2.5, -1.0, 0.3, 3.1, -0.4, 1.7, 0.0, -2.2, 2.9, 0.8, -0.7, 1.2, 2.0, -3.0, 0.5, 1.45]
SEEN = [3, 1, 8, 3, 10, 5, 1]

CASES = [
    {"repetition_penalty": 1.3},
    {"repetition_penalty": 0.8},
    {"temperature": 0.7},
    {"top_k": 5},
    {"top_p": 0.8},
    {"min_p": 0.1},
    {"repetition_penalty": 1.3, "temperature": 0.7, "top_k": 8, "top_p": 0.9, "min_p": 0.05},
    {"repetition_penalty": 1.2, "temperature": 1.5, "top_p": 0.5},
    {"temperature": 0.5, "min_p": 0.2, "top_k": 12},
]


def run(case):
    ids = torch.tensor([SEEN])
    scores = torch.tensor([LOGITS], dtype=torch.float32)
    procs = []
    if case.get("repetition_penalty", 1.0) != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(case["repetition_penalty"]))
    if case.get("temperature", 1.0) != 1.0:
        procs.append(TemperatureLogitsWarper(case["temperature"]))
    if case.get("top_k", 0) != 0:
        procs.append(TopKLogitsWarper(top_k=case["top_k"], min_tokens_to_keep=1))
    if case.get("top_p", 1.0) < 1.0:
        procs.append(TopPLogitsWarper(top_p=case["top_p"], min_tokens_to_keep=1))
    if case.get("min_p") is not None:
        procs.append(MinPLogitsWarper(min_p=case["min_p"], min_tokens_to_keep=1))
    for p in procs:
        scores = p(ids, scores)
    probs = torch.softmax(scores, dim=-1)[0]
    out = [None if torch.isinf(x) else float(x) for x in scores[0]]
    return {"options": case, "scores": out, "probs": [float(x) for x in probs]}


data = {
    "transformers": transformers.__version__,
    "torch": torch.__version__,
    "logits": LOGITS,
    "seen": SEEN,
    "cases": [run(c) for c in CASES],
}
path = Path("tests/reference/data/sampling.json")
path.write_text(json.dumps(data, indent=1) + "\n")
print(f"wrote {path}")
