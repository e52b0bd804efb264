#!/usr/bin/env python3
"""GGUF reference data for wgtune, produced by gguf-py + transformers + tokenizers + sentencepiece.

Run from anywhere (the script changes to the repository root):

    ~/.cache/wgtune-ref/venv/bin/python tests/reference/gguf_generate.py

It rewrites tests/reference/data/gguf/ deterministically (CPU, float32, one thread, fixed seeds).
Measured with: torch 2.15.0, transformers 5.24.0, tokenizers 0.23.3, safetensors 0.8.0, gguf 0.19.0,
sentencepiece 0.2.3, numpy 2.4.6. Other versions are refused unless WGTUNE_REF_ANY_VERSION=1.

Outputs (see the "GGUF" section of tests/reference/README.md):
  quants.gguf                 one [3, 512] tensor per ggml type wgtune reads (F32 F16 BF16 Q8_0 Q4_0 Q4_1
                              Q5_0 Q5_1 Q4_K Q5_K Q6_K), named quant.<TYPE>
  quants_expected.safetensors the same names, F32 [3, 512]: gguf.quants.dequantize of the bytes read back
  unsupported-quant.gguf      one Q2_K tensor (a type wgtune rejects)
  tok-{smollm,llama-bpe,qwen2,gpt2}.gguf   vocab-only byte-level BPE files (tokenizer.ggml.model "gpt2")
  tok-llama-spm.gguf          vocab-only sentencepiece-style file (tokenizer.ggml.model "llama")
  tokens.json                 reference ids/tokens for each tok-*.gguf
  tiny-{llama,qwen2,gpt2}.gguf tiny random models written the way llama.cpp's convert_hf_to_gguf.py does
  models.json                 config transformers derives from each model file, input ids, cross-checks
  models_expected.safetensors <stem>.logits [12, vocab], <stem>.input_ids, tiny-llama.{q_proj,k_proj}
  unknown-arch.gguf           general.architecture "falcon", minimal metadata, one tensor
  report.json                 versions, vocab facts, how each quants.gguf tensor was made, and the
                              tokenizer cross-checks (transformers' GGUF loader, sentencepiece)

Where each value comes from:
  * dequantized values: gguf.quants.dequantize on the tensor bytes as gguf.GGUFReader reads them back;
  * BPE ids: an HF `tokenizers.Tokenizer` built from the vocab/merges read back from the file, with the
    normalizer/pre-tokenizer/BPE options of the original model's tokenizer.json for that pre type;
  * SPM ids: transformers' GGUF tokenizer loader (AutoTokenizer.from_pretrained(dir, gguf_file=...));
  * logits: transformers' GGUF model loader (AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)),
    cross-checked against an independent path (gguf.quants.dequantize + our own inverse permutation /
    transpose + HF model from a state dict), which must agree exactly.

gguf-py has no quantizer for the K-quants. For quants.gguf their blocks are random bytes with chosen
f16 d/dmin; for tiny-llama they come from the simple (not ggml-optimal) quantizers below. Either way the
reference values are what gguf.quants.dequantize/transformers read from the bytes, not what we meant.
"""

import importlib.metadata
import io
import json
import os
import shutil
import sys
import tempfile
import unicodedata
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
import transformers
import tokenizers
import safetensors
import sentencepiece as spm
import gguf
from gguf import GGMLQuantizationType as QT, GGUFReader, GGUFWriter, TokenType
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, Qwen2Config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import to_json, write_json  # noqa: E402  (the JSON layout the other reference files use)

VERSIONS = {
    "torch": "2.15.0",
    "transformers": "5.24.0",
    "tokenizers": "0.23.3",
    "safetensors": "0.8.0",
    "gguf": "0.19.0",
    "sentencepiece": "0.2.3",
    "numpy": "2.4.6",
}

ROOT = Path(__file__).resolve().parents[2]
OUT_REL = Path("tests/reference/data/gguf")
SEED = 4321
META = {"format": "pt"}

# ----------------------------------------------------------------------------- corpus

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps, and the fox runs into the forest.",
    "Hello world! Hello there. Hello again, world. This is a small test of the tokenizer.",
    "I don't think so. You don't know. We don't care. They don't want it. Don't do that!",
    "I'M HERE. I'm here. I'M SURE it's fine. It's FINE. IT'S OK. She's ready, he's not.",
    "We've got it. we've done it. WE'VE SEEN IT. You've been there. They've left. I've seen it.",
    "We'll see. we'll go. I'll try. You'll win. She'd say so. He'd know. They're here. you're right.",
    "In 2024 we counted 2024 boats. In 2023 there were 2023. The year 2024 was long. 2024, 2025, 2026.",
    "Numbers: 1 2 3 10 12 20 42 99 100 123 123 123 256 512 1024 2048 4096 12345 678 13023 2024 2024",
    "Dates (2024) [2024] {123} (123) #20 x=20 y=123 id:2024 ref(2024) page(20) [123] (20) 2024/2024",
    "Prices: $19.99, $20, $123.45 and 50% off. Call 555-0123 at 12:30 on 2024-06-01 (20 items, 123 left).",
    "The answer is 42. 20 + 22 = 42. 100 - 58 = 42. 123 + 123 = 246. 20 20 20 123 123 2024 2024 2024.",
    "def add(a, b):\n    return a + b\n\n\ndef main():\n    for i in range(10):\n        print(i, add(i, 1))\n",
    "class Counter:\n    def __init__(self):\n        self.count = 0\n\n    def step(self):\n        self.count += 1\n"
    "        return self.count\n",
    "fn main() {\n    let mut total: u32 = 0;\n    for i in 0..10 {\n        total += i;\n    }\n"
    "    println!(\"{}\", total);\n}\n",
    "impl Tokenizer {\n    pub fn encode(&self, text: &str) -> Vec<u32> {\n        self.model.encode(text)\n    }\n}\n",
    "if x > 0:\n\treturn x\nelse:\n\treturn -x\n\n# tabs\tand\tspaces    mixed\n",
    "Emoji: 😀 😀 👍 👍 👍🏽 ❤️ 🎉 🚀 🏳️‍🌈 👨‍👩‍👧 ok 😀👍",
    "Café, naïve, résumé, déjà vu, Ünïcödé, Ångström, façade, jalapeño, crème brûlée, São Paulo, Zürich.",
    "Le café est très bon. Où est la gare? Ça va très bien, merci. Élève, été, hôtel, forêt, garçon.",
    "東京は日本の首都です。日本語を話します。東京タワー。",
    "你好，世界。你好！我们是朋友。世界很大。中文文本测试。",
    "한국어 텍스트입니다. 안녕하세요.",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\nHi, how can I help?<|im_end|>\n",
    "Line one\n\nLine two\n\n\nLine three\r\nWindows line\r\n  indented line\n    more indented\n",
    "the the the the and and and of of of to to to in in in is is is that that that it it it",
    "Training a language model means showing it many examples and changing its weights so that the next "
    "word becomes more likely. We measure the loss, compute the gradient, and take a small step.",
    "Question: What is the capital of France? Answer: The capital of France is Paris. Question: How many "
    "days are in a week? Answer: There are seven days in a week.",
]
CORPUS_REPEAT = 3  # more counts, so the multi-digit numbers and common words become merges

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 (as in SmolLM2)
BPE_VOCAB_SIZE = 768  # what BpeTrainer makes; EXTRA_TOKEN (id 768) and EXTRA_MERGES (769-772) follow
# A NORMAL token no merge sequence produces (every trained token is its own merge result). With
# ignore_merges (Llama 3 / llama.cpp "llama-bpe") the pre-token " supercalifragilistic" is looked up
# whole and becomes this one id; every other pre type splits it with the merges.
EXTRA_TOKEN = "Ġsupercalifragilistic"
# Upper-case contractions. The GPT-2 regex the vocab is trained with never yields "'M" as a pre-token,
# so no such merge is learned; these hand-added merges (lowest rank, ids after EXTRA_TOKEN) make the
# case-insensitive (?i:'s|'t|...) of the llama-bpe / qwen2 regexes visible in the ids.
EXTRA_MERGES = ["' M", "' S", "' T", "' D"]
BPE_IDS = {"bos": 1, "eos": 2, "pad": 0}  # <|im_start|>, <|im_end|>, <|endoftext|> (SmolLM2-Instruct style)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPM_VOCAB_SIZE = 500

# Pre-tokenizer regexes of the original tokenizer.json files.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# file -> (general.architecture, tokenizer.ggml.pre)
BPE_FILES = {
    "tok-smollm.gguf": ("llama", "smollm"),
    "tok-llama-bpe.gguf": ("llama", "llama-bpe"),
    "tok-qwen2.gguf": ("qwen2", "qwen2"),
    # llama.cpp spells GPT-2's pre type "gpt-2" (llama-vocab.cpp knows no "gpt2"), and so does
    # convert_hf_to_gguf.py's get_vocab_base_pre(). See README.
    "tok-gpt2.gguf": ("gpt2", "gpt-2"),
}

TOKEN_TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "In 2024, 12345 + 678 = 13023",
    "emoji: 😀 👍🏽 🏳️‍🌈 ok🎉",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n\tprint(i)\n",
    "fn main() {\n    let x: u32 = 42;\n        println!(\"{x}\");\n}",
    "東京は日本の首都です。你好，世界",
    "  leading, trailing   and    multiple spaces  ",
    "line one\n\n\nline two\n\n",
    "I'M sure we've got it, don't you? WE'LL SEE. She'd say it's fine, THEY'RE here. IT'S OK, DON'T, SHE'D",
    "Café naïve Ünïcödé résumé — Ångström",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
    "tabs\tand\r\nwindows newlines",
    "decomposed: cafe\u0301 (e + U+0301)",
    "a<s>b</s>c",
    "A supercalifragilistic word",
]

# ----------------------------------------------------------------------------- models

# tiny-llama tensor types. Layer 0 follows the brief's list; layer 1 rotates the types so every
# quant type meets another tensor role and ffn_down in F16 (and the file stays small).
LLAMA_TYPES = {
    0: {"attn_q": QT.Q4_K, "attn_k": QT.Q5_K, "attn_v": QT.Q6_K, "attn_output": QT.Q4_0,
        "ffn_gate": QT.Q4_1, "ffn_up": QT.BF16, "ffn_down": QT.Q8_0},
    1: {"attn_q": QT.Q5_K, "attn_k": QT.Q6_K, "attn_v": QT.Q4_K, "attn_output": QT.Q8_0,
        "ffn_gate": QT.Q6_K, "ffn_up": QT.Q4_K, "ffn_down": QT.F16},
}
QWEN2_TYPES = {
    0: {"attn_q": QT.Q8_0, "attn_k": QT.F16, "attn_v": QT.Q5_0, "attn_output": QT.F16,
        "ffn_gate": QT.Q8_0, "ffn_up": QT.F16, "ffn_down": QT.Q8_0},
    1: {"attn_q": QT.F16, "attn_k": QT.Q8_0, "attn_v": QT.F16, "attn_output": QT.Q8_0,
        "ffn_gate": QT.F16, "ffn_up": QT.Q5_1, "ffn_down": QT.F16},
}
GPT2_TYPES = {
    0: {"attn_qkv": QT.Q8_0, "attn_output": QT.F16, "ffn_up": QT.Q8_0, "ffn_down": QT.F16},
    1: {"attn_qkv": QT.F16, "attn_output": QT.Q8_0, "ffn_up": QT.F16, "ffn_down": QT.Q8_0},
}
N_INPUT = 12
INPUT_TEXT = "<|im_start|>user\nThe quick brown fox in 2024<|im_end|>"


# ----------------------------------------------------------------------------- helpers


def check_versions():
    got = {
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "gguf": importlib.metadata.version("gguf"),
        "sentencepiece": spm.__version__,
        "numpy": np.__version__,
    }
    if got != VERSIONS and os.environ.get("WGTUNE_REF_ANY_VERSION") != "1":
        sys.exit(f"version mismatch: want {VERSIONS}, have {got} (set WGTUNE_REF_ANY_VERSION=1 to override)")
    return got


def setup():
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def field_value(reader, key):
    """A metadata value as Python (str, int, float, bool or list), read back through GGUFReader."""
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def reader_tensor(reader, name):
    for t in reader.tensors:
        if t.name == name:
            return t
    raise KeyError(name)


def dequant_reader_tensor(t):
    """gguf.quants.dequantize on the bytes as GGUFReader maps them, as [rows, ne0] float32."""
    ne = [int(x) for x in t.shape]  # ne0 first
    out = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.asarray(out, dtype=np.float32).reshape(list(reversed(ne)))


def f16_bytes(values):
    return np.asarray(values, dtype=np.float16).reshape(-1, 1).view(np.uint8)


# ----------------------------------------------------------------------------- K-quant encoders
# Simple round-to-nearest encoders for the ggml block layouts (ggml's own search for the best scales
# is not reproduced; it need not be: every reference value is read back through gguf.quants.dequantize).


def _pack_k_scales(sc, m):
    """6-bit scales and mins of 8 sub-blocks -> the 12-byte Q4_K/Q5_K layout (ggml get_scale_min_k4)."""
    n = sc.shape[0]
    out = np.zeros((n, 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 15) | ((m[:, 4:8] & 15) << 4)
    return out


def _k_affine(blocks, qmax):
    n = blocks.shape[0]
    sb = blocks.reshape(n, 8, 32)
    mn = np.minimum(sb.min(-1), 0.0)
    scale = (sb.max(-1) - mn) / qmax
    minv = -mn
    d16 = (scale.max(-1) / 63).astype(np.float16)
    dmin16 = (minv.max(-1) / 63).astype(np.float16)
    d, dmin = d16.astype(np.float32)[:, None], dmin16.astype(np.float32)[:, None]
    sc = np.clip(np.rint(scale / np.where(d > 0, d, 1)), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(minv / np.where(dmin > 0, dmin, 1)), 0, 63).astype(np.uint8)
    eff_scale = d * sc
    eff_min = dmin * m
    q = np.rint((sb + eff_min[..., None]) / np.where(eff_scale > 0, eff_scale, 1)[..., None])
    q = np.clip(q, 0, qmax).astype(np.uint8)
    return d16, dmin16, sc, m, q


def quantize_q4_k(blocks):
    n = blocks.shape[0]
    d16, dmin16, sc, m, q = _k_affine(blocks, 15)
    qs = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(n, 128)
    return np.concatenate([f16_bytes(d16), f16_bytes(dmin16), _pack_k_scales(sc, m), qs], axis=1)


def quantize_q5_k(blocks):
    n = blocks.shape[0]
    d16, dmin16, sc, m, q = _k_affine(blocks, 31)
    low = q & 15
    qs = (low[:, 0::2, :] | (low[:, 1::2, :] << 4)).reshape(n, 128)
    hi = (q >> 4) & 1  # (n, 8, 32)
    qh = np.zeros((n, 32), dtype=np.uint8)
    for j in range(8):
        qh |= hi[:, j, :] << j
    return np.concatenate([f16_bytes(d16), f16_bytes(dmin16), _pack_k_scales(sc, m), qh, qs], axis=1)


def quantize_q6_k(blocks):
    n = blocks.shape[0]
    sb = blocks.reshape(n, 16, 16)
    amax = np.abs(sb).max(-1)
    s = amax / 31
    d16 = (s.max(-1) / 127).astype(np.float16)
    d = d16.astype(np.float32)[:, None]
    sc = np.clip(np.rint(s / np.where(d > 0, d, 1)), -128, 127).astype(np.int8)
    eff = d * sc
    q = np.rint(sb / np.where(eff != 0, eff, 1)[..., None]) + 32
    q = np.clip(q, 0, 63).astype(np.uint8).reshape(n, 2, 128)
    low = q & 15
    ql = (low[:, :, 0:64] | (low[:, :, 64:128] << 4)).reshape(n, 128)
    hi = ((q >> 4) & 3).reshape(n, 2, 4, 32)
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), f16_bytes(d16)], axis=1)


K_ENCODERS = {QT.Q4_K: quantize_q4_k, QT.Q5_K: quantize_q5_k, QT.Q6_K: quantize_q6_k}


def encode(x, qtype):
    """float32 [rows, cols] -> (array to hand GGUFWriter.add_tensor, raw_dtype)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if qtype == QT.F32:
        return x, None
    if qtype == QT.F16:
        return x.astype(np.float16), None
    if qtype in K_ENCODERS:
        rows, cols = x.shape
        blocks = K_ENCODERS[qtype](x.reshape(-1, 256))
        return blocks.reshape(rows, -1), qtype
    return gguf.quants.quantize(x, qtype), qtype


def check_encoders():
    """Round-trip each K encoder through gguf.quants.dequantize; a layout bug shows as a large error."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 512)).astype(np.float32) * 0.05
    for qt, tol in ((QT.Q4_K, 0.12), (QT.Q5_K, 0.06), (QT.Q6_K, 0.03)):
        data, _ = encode(x, qt)
        back = gguf.quants.dequantize(data, qt)
        rel = np.abs(back - x).max() / np.abs(x).max()
        assert rel < tol, (qt.name, rel)


# ----------------------------------------------------------------------------- 1. quants


def make_quants(out):
    rng = np.random.default_rng(SEED)
    rows, cols = 3, 512
    base = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    w = GGUFWriter(str(out / "quants.gguf"), arch="llama")
    w.add_name("wgtune quant reference")
    notes = {}

    # F32 / F16 / BF16: edge values in row 0 (signed zero, subnormals, large finite values).
    f = base.copy()
    f[0, :6] = [-0.0, 1e-42, -3e-39, 65504.0, -1.5e30, 1.0]
    w.add_tensor("quant.F32", f)
    notes["F32"] = "N(0, 0.05^2); row 0 cols 0-5: -0.0, subnormal 1e-42, subnormal -3e-39, 65504, -1.5e30, 1"
    h = base.copy()
    h[0, :6] = [-0.0, 6e-8, -3.0e-5, 65504.0, -2.0e4, 1.0]  # f16 subnormals 6e-8 and -3e-5
    w.add_tensor("quant.F16", h.astype(np.float16))
    notes["F16"] = "N(0, 0.05^2) as f16; row 0 cols 0-5: -0.0, subnormals 6e-8 and -3e-5, 65504, -2e4, 1"
    b = base.copy()
    b[0, :6] = [-0.0, 1e-40, -3e-39, 3.0e38, -1.5e30, 1.0]
    w.add_tensor("quant.BF16", gguf.quants.quantize(b, QT.BF16), raw_dtype=QT.BF16)
    notes["BF16"] = ("gguf.quants.quantize(BF16) (round to nearest even) of N(0, 0.05^2); row 0 cols 0-5: "
                     "-0.0, subnormals 1e-40 and -3e-39, 3e38, -1.5e30, 1")

    # Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1: real gguf quantization, then a few scales patched to edge values.
    for qt in (QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1):
        data = np.array(gguf.quants.quantize(base * (1 + np.arange(rows, dtype=np.float32)[:, None]), qt))
        blk = gguf.GGML_QUANT_SIZES[qt][1]
        blocks = data.reshape(rows, -1, blk)
        blocks[1, 3, 0:2] = f16_bytes([3.0e-6])[0]  # d: f16 subnormal
        blocks[2, 5, 0:2] = f16_bytes([-0.0123])[0]  # d: negative
        if qt in (QT.Q4_1, QT.Q5_1):
            blocks[2, 6, 2:4] = f16_bytes([0.0371])[0]  # m: positive (real mins are <= 0 here)
            blocks[1, 7, 2:4] = f16_bytes([-2.0e-6])[0]  # m: negative subnormal
        w.add_tensor(f"quant.{qt.name}", data, raw_dtype=qt)
        notes[qt.name] = ("gguf.quants.quantize of N(0, 0.05^2) * (row+1); patched: row 1 block 3 d = 3e-6 "
                          "(f16 subnormal), row 2 block 5 d = -0.0123"
                          + ("; row 2 block 6 m = 0.0371, row 1 block 7 m = -2e-6 (subnormal)"
                             if qt in (QT.Q4_1, QT.Q5_1) else ""))

    # K-quants: random block bytes (every bit pattern of scales/quants), chosen f16 super-block scales.
    for qt in (QT.Q4_K, QT.Q5_K, QT.Q6_K):
        blk = gguf.GGML_QUANT_SIZES[qt][1]
        nb = rows * cols // 256
        data = rng.integers(0, 256, size=(nb, blk), dtype=np.uint8)
        mags = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), size=(nb, 2))).astype(np.float32)
        d, dmin = mags[:, 0].copy(), mags[:, 1].copy()
        d[1] = -d[1]  # negative d
        d[3] = 2.5e-6  # f16 subnormal
        if qt == QT.Q6_K:
            data[:, 208:210] = f16_bytes(d)
            desc = "d at bytes 208-209"
        else:
            dmin[2] = -dmin[2]  # negative dmin
            dmin[4] = -4.0e-6  # negative f16 subnormal
            data[:, 0:2] = f16_bytes(d)
            data[:, 2:4] = f16_bytes(dmin)
            desc = "d, dmin at bytes 0-3; super-block 2 dmin < 0, super-block 4 dmin = -4e-6 (subnormal)"
        w.add_tensor(f"quant.{qt.name}", data.reshape(rows, -1), raw_dtype=qt)
        notes[qt.name] = (f"random block bytes; f16 {desc}, |d| log-uniform in [1e-3, 1e-1]; super-block 1 "
                          "d < 0, super-block 3 d = 2.5e-6 (subnormal); super-blocks are numbered row-major, "
                          "2 per row")

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    reader = GGUFReader(str(out / "quants.gguf"))
    expected = {}
    for t in reader.tensors:
        vals = dequant_reader_tensor(t)
        assert vals.shape == (rows, cols), (t.name, vals.shape)
        assert np.isfinite(vals).all(), t.name
        assert t.name == f"quant.{t.tensor_type.name}", t.name
        expected[t.name] = torch.from_numpy(vals.copy())
    assert len(expected) == 11
    save_file(expected, str(out / "quants_expected.safetensors"), metadata=META)

    # Second opinion: transformers' own torch block decoder (integrations/gguf/dequant.py, used by its
    # newer GGUF path; llama/qwen2/gpt2 still load through gguf-py). Not the reference, only a check.
    from transformers.integrations.gguf.dequant import dequantize as tf_dequantize
    second = {}
    for t in reader.tensors:
        if t.tensor_type in (QT.F32, QT.F16, QT.BF16, QT.Q5_0, QT.Q5_1):
            continue  # transformers' torch decoder has no Q5_0/Q5_1
        raw = torch.from_numpy(np.array(t.data, dtype=np.uint8).reshape(-1))
        alt = tf_dequantize(raw, int(t.tensor_type)).reshape(rows, cols)
        second[t.name] = float((alt - expected[t.name]).abs().max())
    notes["transformers_torch_dequant_max_abs_diff"] = second

    w = GGUFWriter(str(out / "unsupported-quant.gguf"), arch="llama")
    w.add_name("wgtune unsupported quant")
    # Q2_K: a type wgtune does not read (random block bytes; only the type matters).
    q2k = rng.integers(0, 256, size=(rows * cols // 256, gguf.GGML_QUANT_SIZES[QT.Q2_K][1]), dtype=np.uint8)
    w.add_tensor("quant.Q2_K", q2k.reshape(rows, -1), raw_dtype=QT.Q2_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return notes


# ----------------------------------------------------------------------------- 2. tokenizers


def train_bpe():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * CORPUS_REPEAT, trainer=trainer)
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    merges = spec["model"]["merges"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in merges]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    assert None not in tokens and len(tokens) == BPE_VOCAB_SIZE, len(tokens)
    for t in ("2024", "Ġ2024", "123", "Ġ123", "20", "Ġ20"):
        assert t in vocab, f"multi-digit token {t!r} missing from the trained vocab"
    # Every trained token is the merge result of its own bytes, so ignore_merges changes nothing ...
    for t in tokens[len(SPECIALS):]:
        assert [x.value for x in tok.model.tokenize(t)] == [t], t
    # ... except for the appended token, which no merge sequence reaches.
    assert EXTRA_TOKEN not in vocab
    assert len(tok.model.tokenize(EXTRA_TOKEN)) > 1
    tokens.append(EXTRA_TOKEN)
    for m in EXTRA_MERGES:
        assert m.replace(" ", "") not in vocab and all(x in vocab for x in m.split(" ")), m
        merges.append(m)
        tokens.append(m.replace(" ", ""))
    return tokens, merges


def bpe_token_types(tokens):
    return [TokenType.CONTROL if t in SPECIALS else TokenType.NORMAL for t in tokens]


def add_bpe_vocab(w, tokens, merges, pre, chat_template=True):
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(bpe_token_types(tokens))
    w.add_token_merges(merges)
    w.add_bos_token_id(BPE_IDS["bos"])
    w.add_eos_token_id(BPE_IDS["eos"])
    w.add_pad_token_id(BPE_IDS["pad"])
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    if chat_template:
        w.add_chat_template(CHAT_TEMPLATE)


def write_vocab_only(path, arch, fill):
    w = GGUFWriter(str(path), arch=arch)
    fill(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def hf_bpe_reference(tokens, merges, pre):
    """The HF tokenizer of the original model family for this pre type (see README for sources)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ")) for m in merges]
    ignore_merges = pre == "llama-bpe"
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges, fuse_unk=False,
                               byte_fallback=False))
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    elif pre == "gpt-2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre == "llama-bpe":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif pre == "qwen2":
        tok.normalizer = normalizers.NFC()  # Qwen2's tokenizer.json has it (and transformers' Qwen2Tokenizer)
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        raise ValueError(pre)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok


def read_bpe_file(path):
    r = GGUFReader(str(path))
    tokens = field_value(r, "tokenizer.ggml.tokens")
    merges = field_value(r, "tokenizer.ggml.merges")
    types = field_value(r, "tokenizer.ggml.token_type")
    pre = field_value(r, "tokenizer.ggml.pre")
    return tokens, merges, types, pre


def hf_gguf_tokenizer(path):
    tmp = Path(tempfile.mkdtemp(prefix="wgtune-gguf-tok-"))
    try:
        shutil.copy(path, tmp / path.name)
        return AutoTokenizer.from_pretrained(str(tmp), gguf_file=path.name)
    finally:
        shutil.rmtree(tmp)


def crosscheck(ref_cases, hf_tok, add_special):
    agree, disagree = 0, []
    for case in ref_cases:
        got = hf_tok(case["text"], add_special_tokens=add_special)["input_ids"]
        if got == case["ids"]:
            agree += 1
        else:
            disagree.append({"text": case["text"], "ids": got, "tokens": hf_tok.convert_ids_to_tokens(got)})
    return {"agree": agree, "total": len(ref_cases), "disagree": disagree}


def train_spm():
    lines = []
    for text in CORPUS * CORPUS_REPEAT:
        lines.extend(x for x in text.split("\n") if x.strip())
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=SPM_VOCAB_SIZE,
        byte_fallback=True,
        character_coverage=1.0,
        # Llama 2's tokenizer.model settings: no normalization, keep runs of spaces, dummy prefix, digits split
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    assert sp.get_piece_size() == SPM_VOCAB_SIZE
    return sp


def spm_vocab(sp):
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        if sp.is_unknown(i):
            types.append(TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(TokenType.CONTROL)
        elif sp.is_byte(i):
            types.append(TokenType.BYTE)
        elif sp.is_unused(i):
            types.append(TokenType.UNUSED)
        else:
            types.append(TokenType.NORMAL)
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)]
    return tokens, scores, types


def make_tokenizers(out, bpe_tokens, bpe_merges):
    result = {}
    report = {}
    for name, (arch, pre) in BPE_FILES.items():
        path = out / name

        def fill(w, pre=pre, name=name):
            w.add_name(f"wgtune {name[:-5]}")
            add_bpe_vocab(w, bpe_tokens, bpe_merges, pre)

        write_vocab_only(path, arch, fill)
        tokens, merges, types, pre_back = read_bpe_file(path)
        assert tokens == bpe_tokens and merges == bpe_merges and pre_back == pre
        ref = hf_bpe_reference(tokens, merges, pre)
        cases = []
        for text in TOKEN_TEXTS:
            enc = ref.encode(text, add_special_tokens=False)
            cases.append({"text": text, "ids": enc.ids, "tokens": enc.tokens})
        hf = hf_gguf_tokenizer(path)
        check = crosscheck(cases, hf, add_special=True)
        check["class"] = type(hf).__name__
        check["backend_pre_tokenizer"] = json.loads(hf.backend_tokenizer.to_str()).get("pre_tokenizer")
        check["backend_normalizer"] = json.loads(hf.backend_tokenizer.to_str()).get("normalizer")
        report[name] = check
        result[name] = {
            "add_bos": False,
            "model": "gpt2",
            "pre": pre,
            "normalizer": "NFC" if pre == "qwen2" else None,
            "reference": "tokenizers.Tokenizer built from the file's tokens/merges with the original "
                         "tokenizer.json pipeline for this pre type (see README)",
            "cases": cases,
        }

    # SentencePiece-style llama vocab.
    sp = train_spm()
    tokens, scores, types = spm_vocab(sp)
    path = out / "tok-llama-spm.gguf"

    def fill_spm(w):
        w.add_name("wgtune tok-llama-spm")
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)

    write_vocab_only(path, "llama", fill_spm)
    r = GGUFReader(str(path))
    assert field_value(r, "tokenizer.ggml.tokens") == tokens
    hf = hf_gguf_tokenizer(path)
    cases, sp_disagree = [], []
    for text in TOKEN_TEXTS:
        ids = hf(text, add_special_tokens=True)["input_ids"]
        cases.append({"text": text, "ids": ids, "tokens": hf.convert_ids_to_tokens(ids)})
        sp_ids = [1] + sp.encode(text)
        cases[-1]["ids_sentencepiece"] = sp_ids
        if sp_ids != ids:
            sp_disagree.append({"text": text, "ids": sp_ids, "tokens": [sp.id_to_piece(i) for i in sp_ids]})
    report["tok-llama-spm.gguf"] = {
        "class": type(hf).__name__,
        "sentencepiece_agree": len(TOKEN_TEXTS) - len(sp_disagree),
        "total": len(TOKEN_TEXTS),
        "sentencepiece_disagree": sp_disagree,
        "backend_pre_tokenizer": json.loads(hf.backend_tokenizer.to_str()).get("pre_tokenizer"),
        "backend_normalizer": json.loads(hf.backend_tokenizer.to_str()).get("normalizer"),
    }
    result["tok-llama-spm.gguf"] = {
        "add_bos": True,
        "model": "llama",
        "pre": "default",
        "normalizer": None,
        "reference": "transformers AutoTokenizer.from_pretrained(dir, gguf_file=...), add_special_tokens=True; "
                     "ids_sentencepiece: the sentencepiece model itself, with BOS 1 prepended",
        "cases": cases,
    }
    return result, report


# ----------------------------------------------------------------------------- 3. models


def permute(w, n_head, n_head_kv):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w, n_head, n_head_kv):
    """Inverse of permute (written independently of transformers' _reverse_permute_weights)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def randomize_(model, scale):
    """Non-trivial norms and biases (HF init gives ones / zeros, which hide mistakes)."""
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                if "norm" in name or ".ln_" in name or name.startswith("transformer.ln_f"):
                    if name.endswith("weight"):
                        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
                    else:
                        p.copy_(0.05 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(scale * torch.randn(p.shape, generator=g))


def llama_like_tensors(model, cfg, types, permute_qk, tie):
    """HF state dict -> [(gguf name, float32 array [rows, ne0], qtype)], in llama.cpp's naming."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = [("token_embd.weight", sd["model.embed_tokens.weight"], None)]
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        t = types[i]
        q = sd[p + "self_attn.q_proj.weight"]
        k = sd[p + "self_attn.k_proj.weight"]
        if permute_qk:
            q, k = permute(q, n_head, n_head), permute(k, n_head, n_kv)
        out.append((f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"], QT.F32))
        out.append((f"blk.{i}.attn_q.weight", q, t["attn_q"]))
        if p + "self_attn.q_proj.bias" in sd:
            out.append((f"blk.{i}.attn_q.bias", sd[p + "self_attn.q_proj.bias"], QT.F32))
        out.append((f"blk.{i}.attn_k.weight", k, t["attn_k"]))
        if p + "self_attn.k_proj.bias" in sd:
            out.append((f"blk.{i}.attn_k.bias", sd[p + "self_attn.k_proj.bias"], QT.F32))
        out.append((f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"], t["attn_v"]))
        if p + "self_attn.v_proj.bias" in sd:
            out.append((f"blk.{i}.attn_v.bias", sd[p + "self_attn.v_proj.bias"], QT.F32))
        out.append((f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"], t["attn_output"]))
        out.append((f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], QT.F32))
        out.append((f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"], t["ffn_gate"]))
        out.append((f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"], t["ffn_up"]))
        out.append((f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"], t["ffn_down"]))
    out.append(("output_norm.weight", sd["model.norm.weight"], QT.F32))
    if not tie:
        out.append(("output.weight", sd["lm_head.weight"], None))
    return out


def gpt2_tensors(model, cfg, types):
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = [("token_embd.weight", sd["transformer.wte.weight"], QT.F16),
           ("position_embd.weight", sd["transformer.wpe.weight"], QT.F32)]
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        t = types[i]
        # Conv1D weights are [in, out]; llama.cpp transposes them to [out, in] (ne0 = in).
        out += [
            (f"blk.{i}.attn_norm.weight", sd[p + "ln_1.weight"], QT.F32),
            (f"blk.{i}.attn_norm.bias", sd[p + "ln_1.bias"], QT.F32),
            (f"blk.{i}.attn_qkv.weight", sd[p + "attn.c_attn.weight"].T, t["attn_qkv"]),
            (f"blk.{i}.attn_qkv.bias", sd[p + "attn.c_attn.bias"], QT.F32),
            (f"blk.{i}.attn_output.weight", sd[p + "attn.c_proj.weight"].T, t["attn_output"]),
            (f"blk.{i}.attn_output.bias", sd[p + "attn.c_proj.bias"], QT.F32),
            (f"blk.{i}.ffn_norm.weight", sd[p + "ln_2.weight"], QT.F32),
            (f"blk.{i}.ffn_norm.bias", sd[p + "ln_2.bias"], QT.F32),
            (f"blk.{i}.ffn_up.weight", sd[p + "mlp.c_fc.weight"].T, t["ffn_up"]),
            (f"blk.{i}.ffn_up.bias", sd[p + "mlp.c_fc.bias"], QT.F32),
            (f"blk.{i}.ffn_down.weight", sd[p + "mlp.c_proj.weight"].T, t["ffn_down"]),
            (f"blk.{i}.ffn_down.bias", sd[p + "mlp.c_proj.bias"], QT.F32),
        ]
    out += [("output_norm.weight", sd["transformer.ln_f.weight"], QT.F32),
            ("output_norm.bias", sd["transformer.ln_f.bias"], QT.F32)]
    return out


def write_model(path, arch, name, meta, tensors, bpe_tokens, bpe_merges, pre, file_type):
    w = GGUFWriter(str(path), arch=arch)
    w.add_name(name)
    for key, value in meta:
        getattr(w, key)(value)
    w.add_file_type(file_type)
    add_bpe_vocab(w, bpe_tokens, bpe_merges, pre, chat_template=True)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    types = {}
    for tname, arr, qt in tensors:
        qt = QT.F32 if qt is None and arr.ndim == 1 else qt
        qt = qt if qt is not None else QT.Q8_0
        data, raw = encode(arr if arr.ndim == 2 else arr.reshape(1, -1), qt)
        if arr.ndim == 1:
            data = data.reshape(-1)
        w.add_tensor(tname, data, raw_dtype=raw)
        types[tname] = qt.name
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return types


def independent_state_dict(path, arch, cfg):
    """gguf.quants.dequantize + our own inverse layout changes -> HF state dict (no transformers GGUF code)."""
    r = GGUFReader(str(path))
    vals = {t.name: dequant_reader_tensor(t) for t in r.tensors}
    vals = {k: (v.reshape(-1) if k.endswith(("norm.weight", "norm.bias", ".bias")) else v) for k, v in vals.items()}
    sd = {}
    if arch in ("llama", "qwen2"):
        n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        sd["model.embed_tokens.weight"] = vals["token_embd.weight"]
        for i in range(cfg.num_hidden_layers):
            p, b = f"model.layers.{i}.", f"blk.{i}."
            q, k = vals[b + "attn_q.weight"], vals[b + "attn_k.weight"]
            if arch == "llama":
                q, k = unpermute(q, n_head, n_head), unpermute(k, n_head, n_kv)
            sd[p + "self_attn.q_proj.weight"] = q
            sd[p + "self_attn.k_proj.weight"] = k
            sd[p + "self_attn.v_proj.weight"] = vals[b + "attn_v.weight"]
            sd[p + "self_attn.o_proj.weight"] = vals[b + "attn_output.weight"]
            for x in ("q", "k", "v"):
                if b + f"attn_{x}.bias" in vals:
                    sd[p + f"self_attn.{x}_proj.bias"] = vals[b + f"attn_{x}.bias"]
            sd[p + "input_layernorm.weight"] = vals[b + "attn_norm.weight"]
            sd[p + "post_attention_layernorm.weight"] = vals[b + "ffn_norm.weight"]
            sd[p + "mlp.gate_proj.weight"] = vals[b + "ffn_gate.weight"]
            sd[p + "mlp.up_proj.weight"] = vals[b + "ffn_up.weight"]
            sd[p + "mlp.down_proj.weight"] = vals[b + "ffn_down.weight"]
        sd["model.norm.weight"] = vals["output_norm.weight"]
        sd["lm_head.weight"] = vals.get("output.weight", vals["token_embd.weight"])
    else:
        sd["transformer.wte.weight"] = vals["token_embd.weight"]
        sd["transformer.wpe.weight"] = vals["position_embd.weight"]
        for i in range(cfg.n_layer):
            p, b = f"transformer.h.{i}.", f"blk.{i}."
            sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = vals[b + "attn_norm.weight"], vals[b + "attn_norm.bias"]
            sd[p + "attn.c_attn.weight"] = vals[b + "attn_qkv.weight"].T
            sd[p + "attn.c_attn.bias"] = vals[b + "attn_qkv.bias"]
            sd[p + "attn.c_proj.weight"] = vals[b + "attn_output.weight"].T
            sd[p + "attn.c_proj.bias"] = vals[b + "attn_output.bias"]
            sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = vals[b + "ffn_norm.weight"], vals[b + "ffn_norm.bias"]
            sd[p + "mlp.c_fc.weight"] = vals[b + "ffn_up.weight"].T
            sd[p + "mlp.c_fc.bias"] = vals[b + "ffn_up.bias"]
            sd[p + "mlp.c_proj.weight"] = vals[b + "ffn_down.weight"].T
            sd[p + "mlp.c_proj.bias"] = vals[b + "ffn_down.bias"]
        sd["transformer.ln_f.weight"] = vals["output_norm.weight"]
        sd["transformer.ln_f.bias"] = vals["output_norm.bias"]
        sd["lm_head.weight"] = vals["token_embd.weight"]
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in sd.items()}


def config_subset(cfg):
    d = cfg.to_dict()
    rope = d.get("rope_parameters") or {}
    theta = rope.get("rope_theta", d.get("rope_theta"))
    keys = ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps",
            "layer_norm_epsilon", "n_inner", "activation_function", "hidden_act", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "pad_token_id"]
    out = {}
    for k in keys:
        v = getattr(cfg, k, None)
        if v is not None or k in ("tie_word_embeddings",):
            out[k] = v
    if theta is not None:
        out["rope_theta"] = float(theta)
    return out


def load_hf_gguf(path, **config_overrides):
    tmp = Path(tempfile.mkdtemp(prefix="wgtune-gguf-model-"))
    try:
        shutil.copy(path, tmp / path.name)
        m = AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file=path.name, dtype=torch.float32,
                                                 attn_implementation="eager", **config_overrides)
    finally:
        shutil.rmtree(tmp)
    m.eval()
    return m


def make_models(out, bpe_tokens, bpe_merges):
    vocab = len(bpe_tokens)
    ref_tok = hf_bpe_reference(bpe_tokens, bpe_merges, "smollm")
    ids = ref_tok.encode(INPUT_TEXT, add_special_tokens=False).ids
    assert len(ids) >= N_INPUT, len(ids)
    input_ids = ids[:N_INPUT]
    common = dict(vocab_size=vocab, bos_token_id=BPE_IDS["bos"], eos_token_id=BPE_IDS["eos"],
                  pad_token_id=BPE_IDS["pad"])
    specs = {
        "tiny-llama": dict(
            arch="llama", pre="smollm", types=LLAMA_TYPES, init=0.05, file_type=gguf.LlamaFileType.MOSTLY_Q4_K_M,
            cfg=LlamaConfig(**common, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                            max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                            tie_word_embeddings=True, initializer_range=0.05)),
        "tiny-qwen2": dict(
            arch="qwen2", pre="qwen2", types=QWEN2_TYPES, init=0.1, file_type=gguf.LlamaFileType.MOSTLY_Q8_0,
            cfg=Qwen2Config(**common, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
                            use_sliding_window=False, initializer_range=0.1)),
        "tiny-gpt2": dict(
            arch="gpt2", pre="gpt-2", types=GPT2_TYPES, init=0.1, file_type=gguf.LlamaFileType.MOSTLY_F16,
            cfg=GPT2Config(**common, n_embd=64, n_layer=2, n_head=4, n_positions=64, activation_function="gelu_new",
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                           tie_word_embeddings=True, initializer_range=0.1)),
    }
    result, tensors_out = {}, {}
    for seed_off, (stem, s) in enumerate(specs.items()):
        cfg, arch = s["cfg"], s["arch"]
        torch.manual_seed(SEED + 100 + seed_off)
        src = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
        src.eval()
        randomize_(src, s["init"])
        if arch == "llama":
            meta = [("add_context_length", cfg.max_position_embeddings), ("add_embedding_length", cfg.hidden_size),
                    ("add_block_count", cfg.num_hidden_layers), ("add_feed_forward_length", cfg.intermediate_size),
                    ("add_head_count", cfg.num_attention_heads), ("add_head_count_kv", cfg.num_key_value_heads),
                    ("add_rope_freq_base", 10000.0), ("add_layer_norm_rms_eps", cfg.rms_norm_eps),
                    ("add_vocab_size", vocab), ("add_rope_dimension_count", cfg.head_dim)]
            tensors = llama_like_tensors(src, cfg, s["types"], permute_qk=True, tie=True)
            tensors[0] = (tensors[0][0], tensors[0][1], QT.Q8_0)
        elif arch == "qwen2":
            # convert_hf_to_gguf.py's Qwen2Model writes no rope.dimension_count and no vocab_size.
            meta = [("add_context_length", cfg.max_position_embeddings), ("add_embedding_length", cfg.hidden_size),
                    ("add_block_count", cfg.num_hidden_layers), ("add_feed_forward_length", cfg.intermediate_size),
                    ("add_head_count", cfg.num_attention_heads), ("add_head_count_kv", cfg.num_key_value_heads),
                    ("add_rope_freq_base", 1000000.0), ("add_layer_norm_rms_eps", cfg.rms_norm_eps)]
            tensors = llama_like_tensors(src, cfg, s["types"], permute_qk=False, tie=False)
            tensors[0] = (tensors[0][0], tensors[0][1], QT.Q8_0)
            tensors[-1] = (tensors[-1][0], tensors[-1][1], QT.F16)
        else:
            meta = [("add_block_count", cfg.n_layer), ("add_context_length", cfg.n_positions),
                    ("add_embedding_length", cfg.n_embd), ("add_feed_forward_length", 4 * cfg.n_embd),
                    ("add_head_count", cfg.n_head), ("add_layer_norm_eps", cfg.layer_norm_epsilon)]
            tensors = gpt2_tensors(src, cfg, s["types"])
        path = out / f"{stem}.gguf"
        ttypes = write_model(path, arch, stem, meta, tensors, bpe_tokens, bpe_merges, s["pre"], s["file_type"])

        x = torch.tensor([input_ids])
        # Path A (the reference): transformers' GGUF loader.
        # transformers maps gpt2.context_length to `n_ctx` only, so its GPT2Config keeps n_positions = 1024
        # and refuses position_embd [64, 64]; the one override passed is n_positions = context_length.
        overrides = {"n_positions": cfg.n_positions} if arch == "gpt2" else {}
        hf = load_hf_gguf(path, **overrides)
        with torch.no_grad():
            logits = hf(x).logits[0].float().contiguous()
        # Path B (cross-check): gguf.quants.dequantize + own unpermute/transpose + HF model from config.
        sd_b = independent_state_dict(path, arch, cfg)
        mb = AutoModelForCausalLM.from_config(hf.config, attn_implementation="eager", dtype=torch.float32)
        missing, unexpected = mb.load_state_dict(sd_b, strict=False)
        assert not unexpected, unexpected
        assert all("lm_head" in k or k.endswith("attn.bias") for k in missing), missing
        mb.eval()
        with torch.no_grad():
            logits_b = mb(x).logits[0].float()
        hf_sd = hf.state_dict()
        # Layout check against the float model the file was written from: only quantization error remains.
        src_sd = src.state_dict()
        src_rel = 0.0
        for k, v in src_sd.items():
            if k in hf_sd and v.ndim == 2 and not k.endswith("attn.bias"):
                rel = float((hf_sd[k].float() - v).abs().max() / v.abs().max())
                assert rel < 0.2, (stem, k, rel)
                src_rel = max(src_rel, rel)
        w_diff = max(float((hf_sd[k].float() - v).abs().max()) for k, v in sd_b.items() if k in hf_sd)
        l_diff = float((logits - logits_b).abs().max())
        # How far quantization moved the model from the float weights it was written from.
        with torch.no_grad():
            logits_src = src(x).logits[0].float()
        assert tuple(logits.shape) == (N_INPUT, vocab)
        assert w_diff == 0.0, (stem, w_diff)
        assert l_diff <= 1e-5, (stem, l_diff)

        tensors_out[f"{stem}.logits"] = logits
        tensors_out[f"{stem}.input_ids"] = torch.tensor(input_ids, dtype=torch.int32)
        if stem == "tiny-llama":
            tensors_out["tiny-llama.q_proj"] = hf_sd["model.layers.0.self_attn.q_proj.weight"].float().contiguous()
            tensors_out["tiny-llama.k_proj"] = hf_sd["model.layers.0.self_attn.k_proj.weight"].float().contiguous()
        result[path.name] = {
            "arch": arch,
            "tokenizer_pre": s["pre"],
            "config": config_subset(hf.config),
            "tied_output": "output.weight" not in ttypes,
            "tensor_types": ttypes,
            "input_ids": input_ids,
            "input_text": INPUT_TEXT,
            "logits": f"models_expected.safetensors: {stem}.logits F32 [{N_INPUT}, {vocab}]",
            "reference": "transformers AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32), "
                         "eager attention, no attention mask, positions 0..11",
            "transformers_config_overrides": overrides,
            "crosscheck": {
                "independent_path": "gguf.quants.dequantize + own inverse permute/transpose + HF model "
                                    "from state dict",
                "max_abs_weight_diff": w_diff,
                "max_abs_logit_diff": l_diff,
                "max_rel_weight_diff_vs_unquantized_source": src_rel,
                "max_abs_logit_diff_vs_unquantized_source": float((logits - logits_src).abs().max()),
                "logit_abs_max": float(logits.abs().max()),
            },
        }
    save_file(tensors_out, str(out / "models_expected.safetensors"), metadata=META)

    # unknown architecture
    w = GGUFWriter(str(out / "unknown-arch.gguf"), arch="falcon")
    w.add_name("wgtune unknown arch")
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_block_count(1)
    w.add_head_count(4)
    w.add_layer_norm_eps(1e-5)
    w.add_tensor("token_embd.weight", np.arange(4 * 32, dtype=np.float32).reshape(4, 32) / 128)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return result


# ----------------------------------------------------------------------------- main


def main():
    versions = check_versions()
    setup()
    os.chdir(ROOT)
    out = OUT_REL
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    check_encoders()

    quant_notes = make_quants(out)
    bpe_tokens, bpe_merges = train_bpe()
    tokens_json, tok_report = make_tokenizers(out, bpe_tokens, bpe_merges)
    models_json = make_models(out, bpe_tokens, bpe_merges)

    write_json(out / "tokens.json", tokens_json)
    write_json(out / "models.json", models_json)
    write_json(out / "report.json", {
        "versions": versions,
        "bpe_vocab_size": len(bpe_tokens),
        "bpe_extra_tokens": {t: bpe_tokens.index(t) for t in bpe_tokens[BPE_VOCAB_SIZE:]},
        "bpe_merges": len(bpe_merges),
        "special_tokens": {s: i for i, s in enumerate(SPECIALS)},
        "quants": quant_notes,
        "tokenizer_crosscheck": tok_report,
    })
    total = 0
    for p in sorted(out.iterdir()):
        total += p.stat().st_size
        print(f"{p.stat().st_size:>9}  {p}")
    print(f"{total:>9}  total")


if __name__ == "__main__":
    main()
