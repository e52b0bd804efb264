#!/usr/bin/env python3
"""Reference data for wgtune, produced by PyTorch + transformers + PEFT (the referee).

Run from anywhere (the script changes to the repository root):

    ~/.cache/wgtune-ref/venv/bin/python tests/reference/generate.py

It rewrites tests/reference/data/ deterministically (CPU, float32, one thread,
fixed seeds, eager attention). Measured with the stack that
tests/reference/setup-env.sh builds (docs/reference-data.md):
    torch 2.15.0, transformers 5.24.0, peft 0.21.2, tokenizers 0.23.3, safetensors 0.8.0
The script refuses other versions unless WGTUNE_REF_ANY_VERSION=1.

Outputs (see tests/reference/README.md for every tensor name and shape):
  data/sample.jsonl                      8 training examples: text, prompt/completion, messages, alpaca
  data/<model>/                          tiny-llama, tiny-qwen2, tiny-mistral, tiny-gpt2
      config.json, weights, tokenizer.json, tokenizer_config.json, generation_config.json
      reference.safetensors              forward batch (ids, mask, labels, logits), generate prompt logits
      reference.json                     loss, greedy generation, chat template, tokenization, data set + eval
  data/<model>/peft/<method>/            tiny-llama and tiny-gpt2; lora_qv lora_all prompt prefix prefix_proj
                                         prompt_text (prompt's config on two text rows: label[0] is a target)
      initial/                           adapter as PEFT saves it (adapter_config.json, adapter_model.safetensors)
      initial_state.safetensors          (prefix_proj only) the embedding + projection MLP
      step.safetensors, step.json        one batch, the loss and the gradient of every trainable parameter
      train.json                         10 AdamW steps: loss before each step, grad norm before clipping
      final_state.safetensors            trainable parameters after the 10 steps

generate_more.py imports this module to add tiny-qwen3, tiny-gemma3, kv_reference.* and more PEFT cases
(without rewriting anything this script writes); gguf_families.py converts all six folders to GGUF.

Second mode, to check an adapter folder that wgtune wrote:

    python tests/reference/generate.py --check-adapter DIR --model tiny-llama --case lora_qv [--json OUT]

loads `PeftModel.from_pretrained(base, DIR)` and prints the loss on that case's step batch
(step.safetensors), the loss of the reference trajectory, and a full-forward greedy continuation
of the case's generation prompt (the generation reference for prompt/prefix tuning; PEFT's own
generate() is wrong for those, see docs/peft.md).

Choices worth knowing (details in the README):
  * One BPE vocabulary of 384 (ids 0-4: <|endoftext|> <|im_start|> <|im_end|> <|pad|> <s>) for all models;
    tiny-qwen2's tokenizer.json uses Qwen2's NFC + split regex, because transformers 5 rebuilds a
    Qwen2Tokenizer with that pipeline for model_type qwen2 whatever tokenizer.json says.
  * tiny-llama/qwen2/gpt2 config.json are as transformers 5 writes them (RoPE in "rope_parameters",
    "dtype"); tiny-mistral's is rewritten in the transformers 4 / Hub spelling (top-level
    "rope_theta", "rope_scaling": null, "torch_dtype"), checked to load to identical logits.
  * adapter_config.json target_modules are sorted (PEFT stores a set: hash-order otherwise).
"""

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
import peft
import tokenizers
import safetensors
from safetensors.torch import save_file, load_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

VERSIONS = {
    "torch": "2.15.0",
    "transformers": "5.24.0",
    "peft": "0.21.2",
    "tokenizers": "0.23.3",
    "safetensors": "0.8.0",
}

ROOT = Path(__file__).resolve().parents[2]
DATA_REL = Path("tests/reference/data")
SEED = 1234
META = {"format": "pt"}

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<s>"]
VOCAB_SIZE = 384
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. A small model learns to answer the question, "
    "one token at a time. It reads the prompt, then it writes the answer.",
    "Once upon a time there was a little robot who lived in a quiet town by the sea. Every morning the "
    "robot walked to the market and counted the boats: one, two, three, four, five. The people of the "
    "town liked the robot, because it was kind and it always told the truth.",
    "Question: What is the capital of France? Answer: The capital of France is Paris. "
    "Question: How many days are in a week? Answer: There are seven days in a week.",
    "Training a language model means showing it many examples and changing its weights so that the "
    "next word becomes more likely. We measure the loss, compute the gradient, and take a small step.",
    "The system is a helpful assistant. The user asks for help, and the assistant gives a short, clear "
    "answer. Thank you! You are welcome.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 42 100 256 1024 2048 3.14 2026-11-05 12:30 $19.99 50% #1",
    "Punctuation: , . ; : ! ? ' \" ( ) [ ] { } < > / \\ | - _ + = * & ^ % $ # @ ~ `",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n\tprint(i, add(i, 1))\n",
    "Red, green and blue are colors. The sky is blue and the grass is green. Good morning, good night.",
]

# Model name -> (tokenizer flavour, pre-tokenizer, saved dtype)
MODELS = {
    "tiny-llama": ("llama", "bytelevel", torch.float32),
    "tiny-qwen2": ("llama", "qwen2", torch.float32),
    "tiny-mistral": ("llama", "bytelevel", torch.bfloat16),
    "tiny-gpt2": ("gpt2", "bytelevel", torch.float16),
}
PEFT_MODELS = ["tiny-llama", "tiny-gpt2"]
PEFT_METHODS = ["lora_qv", "lora_all", "prompt", "prefix", "prefix_proj", "prompt_text"]  # append only: seeds use the index
# Cases that reuse another case's PeftConfig (and lr) on a different step batch.
PEFT_CONFIG_OF = {"prompt_text": "prompt"}

FORWARD_SENTENCES = [
    "The little robot counted twelve boats by the quiet sea.",
    "Good morning, how are you?",
]
GENERATE_PROMPTS = [
    "Once upon a time",  # case 0 for every model (its prompt logits are stored too)
    # Later prompts are kept only where greedy decoding stops at an EOS within MAX_NEW_TOKENS. With
    # these random weights that happens for tiny-llama ("A small model learns to": <|endoftext|>,
    # the 2nd id of the EOS list, after 18 tokens; then <|im_end|> after 3; then EOS as the very
    # first new token), tiny-qwen2 and tiny-mistral; never for tiny-gpt2.
    "A small model learns to",
    "the boats: one, two, three,",
    "jumps over the lazy dog.",
    "language model",
    "learns to answer",
]
MAX_NEW_TOKENS = 24
CHAT_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]
TOKENIZATION_STRINGS = [
    "",
    "Hello world",
    " leading space and  two  spaces",
    "12345",
    "3.14159 and 2026-11-05",
    "emoji: 😀👍🏽",
    "CJK: 你好，世界。日本語",
    "def f(x):\n\treturn x * 2\n\n\n",
    "tabs\tand\r\nwindows newlines",
    "<|im_start|>user\nhi<|im_end|>\n",
    "café naïve Ünïcödé",
    "decomposed: cafe\u0301",
]

SAMPLE_JSONL = [
    {"text": "The quick brown fox jumps over the lazy dog. It was 12 degrees outside."},
    {"prompt": "Question: What is 7 plus 5?\nAnswer:", "completion": " 12"},
    {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What color is the sky?"},
            {"role": "assistant", "content": "The sky is blue."},
        ]
    },
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "Name three colors.", "input": "", "output": "Red, green and blue."},
    {
        "messages": [
            {"role": "user", "content": "Count to three."},
            {"role": "assistant", "content": "One, two, three."},
            {"role": "user", "content": "And then?"},
            {"role": "assistant", "content": "Four!"},
        ]
    },
    {"text": "def add(a, b):\n\treturn a + b\n\nprint(add(2, 40))"},
    {"prompt": "The capital of France is", "completion": " Paris."},
]
STEP_EXAMPLES = [1, 2]  # indices into SAMPLE_JSONL used as the PEFT step batch (prompt/completion + messages)
# prompt_text's step batch: the first two text rows, whose labels equal their ids, so label[0] is a target.
# PEFT prompt tuning prepends num_virtual_tokens labels of -100, so label[0] is predicted from the last
# virtual token and counts in the loss; in the batch above label[0] is -100 and that rule is never exercised.
STEP_EXAMPLES_TEXT = [i for i, ex in enumerate(SAMPLE_JSONL) if "text" in ex][:2]
TRAIN_STEPS = 10
GEN_AFTER_TRAIN = 12


# ----------------------------------------------------------------------------- helpers


def check_versions():
    got = {
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
    }
    if got != VERSIONS and os.environ.get("WGTUNE_REF_ANY_VERSION") != "1":
        sys.exit(f"version mismatch: want {VERSIONS}, have {got} (set WGTUNE_REF_ANY_VERSION=1 to override)")
    return got


def setup_torch():
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def to_json(obj, indent=0):
    """json.dumps(indent=2), except that lists of scalars stay on one line."""
    pad, inner = "  " * indent, "  " * (indent + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {to_json(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(inner + to_json(v, indent + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=False)


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = to_json(obj) + "\n"
    assert json.loads(text) == obj
    path.write_text(text)


def i32(x):
    return torch.as_tensor(x, dtype=torch.int32).contiguous()


def f32(x):
    return x.detach().to(torch.float32).contiguous()


def peft_name(n):
    return n.replace(".default", "")


def load_base(model_dir):
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    m.eval()
    return m


def load_tok(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


# ----------------------------------------------------------------------------- tokenizer


# Qwen2's pre-tokenizer regex (transformers' Qwen2Tokenizer hard-codes it, see README).
QWEN2_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def train_tokenizer(flavour, pretok):
    tok = Tokenizer(models.BPE())
    if pretok == "qwen2":
        # What transformers 5 rebuilds for model_type qwen2 whatever tokenizer.json says.
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i
    if flavour == "llama":
        # Exactly the template transformers rebuilds from add_bos_token=True, so a re-save is identical.
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", bos)]
        )
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    return tok


def tokenizer_meta(flavour):
    if flavour == "llama":
        return {"bos": "<s>", "eos": "<|im_end|>", "pad": "<|pad|>", "add_bos": True,
                "gen_eos": ["<|im_end|>", "<|endoftext|>"]}
    return {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": "<|pad|>", "add_bos": False,
            "gen_eos": ["<|endoftext|>"]}


def write_tokenizer(model_dir, flavour, pretok):
    tok = train_tokenizer(flavour, pretok)
    tok.save(str(model_dir / "tokenizer.json"))
    m = tokenizer_meta(flavour)
    added = {
        str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, s in enumerate(SPECIALS)
    }
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": m["bos"],
        "eos_token": m["eos"],
        "pad_token": m["pad"],
        "unk_token": None,
        "add_bos_token": m["add_bos"],
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 128,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }
    write_json(model_dir / "tokenizer_config.json", cfg)
    ids = {k: tok.token_to_id(m[k]) for k in ("bos", "eos", "pad")}
    ids["gen_eos"] = [tok.token_to_id(s) for s in m["gen_eos"]]
    return ids


# ----------------------------------------------------------------------------- models


def make_config(name, ids):
    common = dict(
        vocab_size=VOCAB_SIZE,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        initializer_range=0.1,
    )
    llama_like = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        attention_dropout=0.0,
    )
    if name == "tiny-llama":
        return LlamaConfig(
            **common, **llama_like, intermediate_size=96, tie_word_embeddings=True, rope_theta=10000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        )
    if name == "tiny-qwen2":
        return Qwen2Config(
            **common, **llama_like, intermediate_size=128, tie_word_embeddings=False, rope_theta=10000.0,
            use_sliding_window=False,
        )
    if name == "tiny-mistral":
        return MistralConfig(
            **common, **llama_like, intermediate_size=96, tie_word_embeddings=False, rope_theta=1000000.0,
            sliding_window=None,
        )
    if name == "tiny-gpt2":
        return GPT2Config(
            **common, n_embd=64, n_layer=2, n_head=4, n_positions=128, activation_function="gelu_new",
            tie_word_embeddings=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            layer_norm_epsilon=1e-5,
        )
    raise ValueError(name)


def legacy_rope_config(path):
    """Rewrite config.json the way transformers 4.x / most Hub models spell RoPE (top-level
    rope_theta, rope_scaling) instead of transformers 5's rope_parameters."""
    cfg = json.loads(path.read_text())
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    cfg["rope_scaling"] = None if rp.get("rope_type", "default") == "default" else rp
    cfg["torch_dtype"] = cfg.pop("dtype")
    write_json(path, dict(sorted(cfg.items())))


def build_model(name, model_dir, ids, save_dtype, model_seed, cfg=None, post_init=None):
    """cfg/post_init: used by generate_more.py (its own configs; post_init(model) randomizes norm weights)."""
    cfg = cfg if cfg is not None else make_config(name, ids)
    torch.manual_seed(model_seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    if post_init is not None:
        post_init(model)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos"],
        eos_token_id=ids["gen_eos"] if len(ids["gen_eos"]) > 1 else ids["gen_eos"][0],
        pad_token_id=ids["pad"],
        do_sample=False,
    )
    kwargs = {"max_shard_size": "200KB"} if name == "tiny-qwen2" else {}
    model.to(save_dtype).save_pretrained(model_dir, **kwargs)
    if name == "tiny-mistral":
        legacy_rope_config(model_dir / "config.json")
    # Reload what is on disk, upcast to f32: all references are computed from the stored weights.
    ref = load_base(model_dir)
    ref_sd = ref.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(ref_sd[k], v.float()), k
    # ...and the config on disk must mean the in-memory config (catches a wrong legacy RoPE rewrite).
    # (A fresh f32 model: `model.to(bf16)` also rounded its RoPE inv_freq buffer.)
    fresh = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    fresh.load_state_dict(ref_sd)
    x = torch.arange(5, 45).reshape(2, 20)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=x).logits, ref(input_ids=x).logits), name
    return ref


# ----------------------------------------------------------------------------- part A


def greedy_full(model, prompt_ids, max_new, eos_ids, margins=None):
    """Greedy decoding that re-runs the whole forward pass each step (no KV cache).
    If `margins` is a list, the top-1 minus top-2 logit gap of each step is appended to it."""
    ids = list(prompt_ids)
    new = []
    with torch.no_grad():
        for _ in range(max_new):
            x = torch.tensor([ids])
            last = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1]
            top = last.topk(2).values
            if margins is not None:
                margins.append((top[0] - top[1]).item())
            nxt = int(last.argmax())
            new.append(nxt)
            ids.append(nxt)
            if nxt in eos_ids:
                break
    return new


def hf_generate(model, prompt_ids, ids):
    x = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
            eos_token_id=ids["gen_eos"], pad_token_id=ids["pad"],
        )
    return out[0, len(prompt_ids):].tolist()


def part_a(name, model, tok, raw_tok, ids):
    tensors, ref = {}, {}
    V = model.config.vocab_size

    # Tokenizer: transformers must agree with the raw tokenizers library (what the Rust crate runs).
    cases = []
    for s in TOKENIZATION_STRINGS:
        with_sp = tok(s, add_special_tokens=True).input_ids
        without = tok(s, add_special_tokens=False).input_ids
        assert with_sp == raw_tok.encode(s, add_special_tokens=True).ids, s
        assert without == raw_tok.encode(s, add_special_tokens=False).ids, s
        dec = tok.decode(without)
        dec_sp = tok.decode(with_sp, skip_special_tokens=False)
        dec_skip = tok.decode(with_sp, skip_special_tokens=True)
        assert dec == raw_tok.decode(without, skip_special_tokens=False), s
        assert dec_sp == raw_tok.decode(with_sp, skip_special_tokens=False), s
        assert dec_skip == raw_tok.decode(with_sp, skip_special_tokens=True), s
        cases.append({
            "text": s, "ids_with_special": with_sp, "ids_no_special": without,
            "decode_no_special_ids": dec, "decode_with_special_ids": dec_sp,
            "decode_with_special_ids_skip_special": dec_skip, "roundtrip_exact": dec == s,
        })
    ref["tokenization"] = cases

    # Forward: batch of 2, right padded.
    seqs = [tok(s, add_special_tokens=True).input_ids for s in FORWARD_SENTENCES]
    T = max(len(s) for s in seqs)
    input_ids = torch.full((2, T), ids["pad"], dtype=torch.long)
    mask = torch.zeros((2, T), dtype=torch.long)
    for b, s in enumerate(seqs):
        input_ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, labels=labels)
    logits = out.logits
    # The loss by hand: mean over all shifted targets of the batch.
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    tgt = labels[:, 1:]
    keep = tgt != -100
    manual = -lp[keep].gather(-1, tgt[keep][:, None]).mean()
    assert abs(manual.item() - out.loss.item()) < 1e-5
    tensors.update({
        "forward.input_ids": i32(input_ids), "forward.attention_mask": i32(mask),
        "forward.labels": i32(labels), "forward.logits": f32(logits),
    })
    ref["forward"] = {
        "sentences": FORWARD_SENTENCES, "lengths": [len(s) for s in seqs], "T": T, "vocab": V,
        "loss": out.loss.item(), "loss_targets": int(keep.sum()),
        "note": "logits at attention_mask==0 positions are not meaningful; compare only mask==1",
    }

    # Greedy generation: HF generate (cached) must equal a no-cache full-forward loop.
    gens = []
    for i, p in enumerate(GENERATE_PROMPTS):
        pid = tok(p, add_special_tokens=True).input_ids
        g = hf_generate(model, pid, ids)
        margins = []
        full = greedy_full(model, pid, MAX_NEW_TOKENS, ids["gen_eos"], margins)
        assert g == full, (name, p, g, full)
        stopped = bool(g) and g[-1] in ids["gen_eos"]
        case = {"prompt": p, "prompt_ids": pid, "greedy_ids": g, "greedy_full_ids": full,
                "stopped_at_eos": stopped, "eos_token_id": ids["gen_eos"], "max_new_tokens": MAX_NEW_TOKENS,
                "top2_logit_margins": margins, "text": tok.decode(g)}
        if i == 0:
            x = torch.tensor([pid])
            with torch.no_grad():
                tensors["generate.prompt_ids"] = i32(x[0])
                tensors["generate.prompt_logits"] = f32(model(input_ids=x).logits[0])
            gens.append(case)
        elif stopped:
            gens.append(case)
    ref["generate"] = gens

    # Chat template.
    rendered = tok.apply_chat_template(CHAT_MESSAGES, add_generation_prompt=True, tokenize=False)
    chat_ids = tok(rendered, add_special_tokens=False).input_ids
    assert chat_ids == raw_tok.encode(rendered, add_special_tokens=False).ids
    ref["chat"] = {"messages": CHAT_MESSAGES, "add_generation_prompt": True, "rendered": rendered,
                   "ids": chat_ids}
    return tensors, ref


# ----------------------------------------------------------------------------- part B


def render(tok, messages, gen):
    return tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)


class TemplateNotPrefixStable(Exception):
    """The rendering of the first i messages is not a prefix of a longer rendering (Qwen3's template drops
    the <think> block of earlier assistant turns), so assistant turns cannot be located."""


def tokenize_example(ex, tok, eos, bos_added):
    """The masking rules (README): returns (kind, ids, labels)."""
    enc = lambda s, sp: tok(s, add_special_tokens=sp).input_ids  # noqa: E731

    def prompt_completion(p_text, c_text):
        p = enc(p_text, True)
        c = enc(c_text, False)
        if not c or c[-1] != eos:
            c = c + [eos]
        return p + c, [-100] * len(p) + c

    if "text" in ex:
        ids = enc(ex["text"], True)
        if not ids or ids[-1] != eos:
            ids = ids + [eos]
        return "text", ids, list(ids)
    if "prompt" in ex:
        return ("prompt_completion",) + prompt_completion(ex["prompt"], ex["completion"])
    if "instruction" in ex:
        inp = ex.get("input") or ""
        p = f"{ex['instruction']}\n\n{inp}\n\n" if inp else f"{ex['instruction']}\n\n"
        return ("alpaca",) + prompt_completion(p, ex["output"])
    if "messages" in ex:
        msgs = ex["messages"]
        segments = []  # (text, labelled)
        done = ""
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            with_gen = render(tok, msgs[:i], True)
            full_i = render(tok, msgs[: i + 1], False)
            if not (with_gen.startswith(done) and full_i.startswith(with_gen)):
                raise TemplateNotPrefixStable(i)
            segments.append((with_gen[len(done):], False))
            segments.append((full_i[len(with_gen):], True))
            done = full_i
        full = render(tok, msgs, False)
        if not full.startswith(done):
            raise TemplateNotPrefixStable(len(msgs))
        segments.append((full[len(done):], False))
        ids, labels = [], []
        for text, labelled in segments:
            if not text:
                continue
            t = enc(text, False)
            ids += t
            labels += t if labelled else [-100] * len(t)
        # BOS once: a template that renders bos_token itself (Gemma's) already starts with it.
        if bos_added is not None and (not ids or ids[0] != bos_added):
            ids.insert(0, bos_added)
            labels.insert(0, -100)
        return "messages", ids, labels
    raise ValueError(ex)


def data_examples(tok, ids, errors=None):
    """errors=None: raise on a prefix-unstable template; a list: append the example index and return
    (kind, None, None) for it."""
    bos_added = ids["bos"] if adds_bos(tok) else None
    out = []
    for i, ex in enumerate(SAMPLE_JSONL):
        try:
            out.append(tokenize_example(ex, tok, ids["eos"], bos_added))
        except TemplateNotPrefixStable:
            if errors is None:
                raise
            errors.append(i)
            out.append(("messages", None, None))
    return out


def adds_bos(tok):
    """True if encode(add_special_tokens=True) prepends BOS."""
    e = tok("a", add_special_tokens=True).input_ids
    return len(e) == 2 and e[0] == tok.bos_token_id


def part_b(model, tok, ids):
    errors = []
    exs = data_examples(tok, ids, errors)
    out, total, count = [], 0.0, 0
    for kind, x, y in exs:
        if x is None:
            out.append({"kind": kind, "error": "template_not_prefix_stable", "ids": [], "labels": [],
                        "loss_sum": 0.0, "targets": 0})
            continue
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([x])).logits[0].double()
        lp = torch.log_softmax(logits[:-1], -1)
        tgt = torch.tensor(y[1:])
        keep = tgt != -100
        nll = -lp[keep].gather(-1, tgt[keep][:, None]).sum().item()
        n = int(keep.sum())
        total += nll
        count += n
        out.append({"kind": kind, "ids": x, "labels": y, "loss_sum": nll, "targets": n})
    mean = total / count
    res = {"file": "sample.jsonl", "eos_id": ids["eos"], "bos_prepended_for_messages": adds_bos(tok),
           "examples": out, "eval_loss": mean, "eval_ppl": math.exp(mean), "eval_tokens": count}
    if errors:
        res["template_not_prefix_stable"] = errors
        res["eval_note"] = "eval_* exclude the examples in template_not_prefix_stable"
    return res


# ----------------------------------------------------------------------------- part C


def peft_config(method, arch, model_dir_rel):
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, TaskType

    method = PEFT_CONFIG_OF.get(method, method)
    llama_all = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if method in ("lora_qv", "lora_all"):
        if arch == "gpt2":
            targets = ["c_attn"] if method == "lora_qv" else ["c_attn", "c_proj", "c_fc"]
        else:
            targets = ["q_proj", "v_proj"] if method == "lora_qv" else llama_all
        return LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, lora_dropout=0.0,
                          target_modules=targets, bias="none", fan_in_fan_out=(arch == "gpt2"))
    if method == "prompt":
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=8,
                                  prompt_tuning_init=PromptTuningInit.TEXT,
                                  prompt_tuning_init_text="answer the question",
                                  tokenizer_name_or_path=model_dir_rel)
    if method == "prefix":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6, prefix_projection=False)
    if method == "prefix_proj":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6, prefix_projection=True,
                                  encoder_hidden_size=32)
    raise ValueError(method)


def lr_for(method):
    return 1e-2 if PEFT_CONFIG_OF.get(method, method) in ("prompt", "prefix") else 5e-3


def step_examples(method):
    """The SAMPLE_JSONL rows of a case's step batch."""
    return STEP_EXAMPLES_TEXT if method == "prompt_text" else STEP_EXAMPLES


def step_batch(tok, ids, rows=STEP_EXAMPLES):
    exs = data_examples(tok, ids, errors=[])
    chosen = [exs[i] for i in rows]
    assert all(x is not None for _, x, _ in chosen), rows
    T = max(len(x) for _, x, _ in chosen)
    input_ids = torch.full((len(chosen), T), ids["pad"], dtype=torch.long)
    labels = torch.full((len(chosen), T), -100, dtype=torch.long)
    mask = torch.zeros((len(chosen), T), dtype=torch.long)
    for b, (_, x, y) in enumerate(chosen):
        input_ids[b, : len(x)] = torch.tensor(x)
        labels[b, : len(y)] = torch.tensor(y)
        mask[b, : len(x)] = 1
    return input_ids, labels, mask


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def state_of(model):
    return {peft_name(n): f32(p) for n, p in trainable(model)}


def batch_loss(model, input_ids, labels, mask):
    return model(input_ids=input_ids, attention_mask=mask, labels=labels).loss


def gen_prompt_ids(tok, ids):
    """The prompt part of SAMPLE_JSONL[1] (prompt/completion), as tokenized for training."""
    ex = SAMPLE_JSONL[STEP_EXAMPLES[0]]
    return tok(ex["prompt"], add_special_tokens=True).input_ids


def fix_adapter_config(folder):
    """PEFT keeps target_modules as a set, so its saved order follows Python's string hashing;
    sort it (same formatting as PEFT: indent 2, sorted keys) so reruns are byte-identical.
    PEFT also records the base model path: it must be the repo-relative one."""
    p = folder / "adapter_config.json"
    cfg = json.loads(p.read_text())
    for k in ("base_model_name_or_path", "tokenizer_name_or_path"):
        assert not str(cfg.get(k) or "").startswith("/"), (k, cfg.get(k))
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    p.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def part_c(name, model_dir_rel, tok, ids, arch, method_seed):
    from peft import get_peft_model, PeftModel

    out_dir = DATA_REL / name / "peft"
    prompt_ids = gen_prompt_ids(tok, ids)
    for mi, method in enumerate(PEFT_METHODS):
        input_ids, labels, mask = step_batch(tok, ids, step_examples(method))
        d = out_dir / method
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        base = load_base(model_dir_rel)
        cfg = peft_config(method, arch, str(model_dir_rel))
        torch.manual_seed(method_seed + mi)
        model = get_peft_model(base, cfg)
        model.eval()  # no dropout anywhere (all dropout probabilities are 0 too)
        g = torch.Generator().manual_seed(method_seed + 100 + mi)
        with torch.no_grad():
            for n, p in trainable(model):
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
                elif method in ("prefix", "prefix_proj") and n.endswith("embedding.weight"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        names = [n for n, _ in trainable(model)]
        extra = {}
        if cfg.peft_type.value == "PROMPT_TUNING":
            init_ids = tok("answer the question")["input_ids"]
            extra["prompt_init_token_ids"] = (init_ids * 8)[:8]
            # PEFT calls the embedding module: for Gemma that includes the sqrt(hidden) scale.
            with torch.no_grad():
                emb = base.get_input_embeddings()(torch.tensor(extra["prompt_init_token_ids"]))
            assert torch.equal(trainable(model)[0][1], emb)

        # initial adapter, as PEFT saves it
        model.save_pretrained(d / "initial")
        fix_adapter_config(d / "initial")
        if method == "prefix_proj":
            save_file(state_of(model), d / "initial_state.safetensors", metadata=META)

        # one step: loss + gradients
        model.zero_grad()
        loss = batch_loss(model, input_ids, labels, mask)
        loss.backward()
        step = {"input_ids": i32(input_ids), "labels": i32(labels), "attention_mask": i32(mask)}
        for n, p in trainable(model):
            step[peft_name(n) + ".grad"] = f32(p.grad)
        save_file(step, d / "step.safetensors", metadata=META)
        # Targets as PEFT's loss counts them: prompt tuning prepends num_virtual_tokens labels of -100, so
        # label[0] is a target too (predicted from the last virtual token); LoRA and prefix tuning shift as usual.
        n_without_first = int((labels[:, 1:] != -100).sum())
        first_counts = cfg.peft_type.value == "PROMPT_TUNING"
        n_targets = int((labels != -100).sum()) if first_counts else n_without_first
        step_json = {"loss": loss.item(), "targets": n_targets}
        if n_targets != n_without_first:
            # The loss without the label[0] targets, by hand from PEFT's logits (virtual tokens included):
            # logits[:, N-1+t] predicts labels[:, t]. The all-targets mean must equal PEFT's loss.
            nv = cfg.num_virtual_tokens
            with torch.no_grad():
                logits = model(input_ids=input_ids, attention_mask=mask).logits
            assert logits.shape[1] == nv + input_ids.shape[1]
            lp = torch.log_softmax(logits[:, nv - 1 : -1].double(), -1)
            nll = -lp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
            keep = labels != -100
            assert abs(nll[keep].mean().item() - loss.item()) < 1e-5, (method, nll[keep].mean().item(), loss.item())
            keep[:, 0] = False
            assert int(keep.sum()) == n_without_first
            step_json.update({"targets_without_first": n_without_first,
                              "loss_without_first": nll[keep].mean().item()})
        step_json["trainable"] = {peft_name(n): list(p.shape) for n, p in trainable(model)}
        write_json(d / "step.json", {**step_json, **extra})

        # the saved initial adapter must reload to the same loss (checks the check mode, too)
        with torch.no_grad():
            reloaded = PeftModel.from_pretrained(load_base(model_dir_rel), d / "initial")
            reloaded.eval()
            rl = batch_loss(reloaded, input_ids, labels, mask).item()
        assert abs(rl - loss.item()) < 1e-5, (method, rl, loss.item())

        with torch.no_grad():
            gen_initial = greedy_full(model, prompt_ids, GEN_AFTER_TRAIN, ids["gen_eos"])

        # 10 AdamW steps on the same batch
        params = [p for _, p in trainable(model)]
        opt = torch.optim.AdamW(params, lr=lr_for(method), betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
        losses, norms = [], []
        for _ in range(TRAIN_STEPS):
            opt.zero_grad()
            l = batch_loss(model, input_ids, labels, mask)
            l.backward()
            norms.append(torch.nn.utils.clip_grad_norm_(params, 1.0).item())
            losses.append(l.item())
            opt.step()
        margins = []
        with torch.no_grad():
            final_loss = batch_loss(model, input_ids, labels, mask).item()
            gen_final = greedy_full(model, prompt_ids, GEN_AFTER_TRAIN, ids["gen_eos"], margins)
        save_file(state_of(model), d / "final_state.safetensors", metadata=META)
        write_json(d / "train.json", {
            "optimizer": "torch.optim.AdamW", "lr": lr_for(method), "betas": [0.9, 0.999], "eps": 1e-8,
            "weight_decay": 0.01, "weight_decay_applies_to": "all trainable tensors (one param group)",
            "schedule": "constant", "clip_grad_norm": 1.0, "steps": TRAIN_STEPS,
            "batch": "step.safetensors", "params_order": [peft_name(n) for n in names],
            "loss_before_step": losses, "grad_norm_before_clip": norms, "loss_after_training": final_loss,
            "greedy_prompt_ids": prompt_ids, "greedy_max_new_tokens": GEN_AFTER_TRAIN,
            "greedy_initial_ids": gen_initial, "greedy_after_training_ids": gen_final,
            "greedy_after_training_top2_logit_margins": margins,
            "greedy_note": "full-forward greedy loop without KV cache (not PEFT generate())",
        })
        print(f"  {name} {method}: step loss {loss.item():.5f}, after {TRAIN_STEPS} steps {final_loss:.5f}",
              flush=True)


# ----------------------------------------------------------------------------- check mode


def check_adapter(args):
    from peft import PeftModel

    model_dir = DATA_REL / args.model
    case_dir = model_dir / "peft" / args.case
    tok = load_tok(model_dir)
    ref_json = json.loads((model_dir / "reference.json").read_text())
    eos_ids = ref_json["ids"]["generation_eos"]
    step = load_file(case_dir / "step.safetensors")
    input_ids, labels, mask = (step[k].long() for k in ("input_ids", "labels", "attention_mask"))
    model = PeftModel.from_pretrained(load_base(model_dir), args.check_adapter)
    model.eval()
    with torch.no_grad():
        loss = batch_loss(model, input_ids, labels, mask).item()
    train = json.loads((case_dir / "train.json").read_text())
    greedy = greedy_full(model, train["greedy_prompt_ids"], train["greedy_max_new_tokens"], eos_ids)
    res = {
        # Repo-relative when inside the repository: no absolute paths in committed records.
        "adapter": os.path.relpath(args.check_adapter, ROOT) if Path(args.check_adapter).is_relative_to(ROOT)
        else str(args.check_adapter), "model": args.model, "case": args.case,
        "peft_type": model.peft_config["default"].peft_type.value,
        "loss_on_step_batch": loss,
        "reference_initial_loss": json.loads((case_dir / "step.json").read_text())["loss"],
        "reference_loss_before_step": train["loss_before_step"],
        "reference_loss_after_training": train["loss_after_training"],
        "greedy_prompt_ids": train["greedy_prompt_ids"], "greedy_ids": greedy,
        "reference_greedy_after_training_ids": train["greedy_after_training_ids"],
        "greedy_text": tok.decode(greedy),
    }
    text = to_json(res)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


# ----------------------------------------------------------------------------- main


def generate_all(versions):
    data = DATA_REL
    data.mkdir(parents=True, exist_ok=True)
    with open(data / "sample.jsonl", "w") as f:
        for ex in SAMPLE_JSONL:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")

    for mi, (name, (flavour, pretok, save_dtype)) in enumerate(MODELS.items()):
        model_dir = data / name
        # check_wgtune_adapters.sh's records are not this script's output: keep them across the rewrite.
        kept = {p.relative_to(model_dir): p.read_bytes() for p in model_dir.glob("peft/*/wgtune_check.json")}
        # generate_more.py's files (kv_reference.*, and peft/ of the models this script gives none): kept too.
        others = list(model_dir.glob("kv_reference.*"))
        if name not in PEFT_MODELS:
            others += [p for p in model_dir.glob("peft/**/*") if p.is_file()]
        others = {p.relative_to(model_dir): p.read_bytes() for p in others}
        if model_dir.exists():
            shutil.rmtree(model_dir)
        model_dir.mkdir(parents=True)
        ids = write_tokenizer(model_dir, flavour, pretok)
        model = build_model(name, model_dir, ids, save_dtype, SEED + 10 * mi)
        tok = load_tok(model_dir)
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (ids["bos"], ids["eos"], ids["pad"])
        assert len(tok) == VOCAB_SIZE
        raw_tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        tensors, ref = part_a(name, model, tok, raw_tok, ids)
        ref = {
            "model": name, "arch": model.config.model_type, "tokenizer_flavour": flavour,
            "pre_tokenizer": pretok, "transformers_tokenizer_class": type(tok).__name__,
            "weights_dtype": str(save_dtype).replace("torch.", ""),
            "versions": versions,
            "ids": {"bos": ids["bos"], "eos": ids["eos"], "pad": ids["pad"], "generation_eos": ids["gen_eos"],
                    "specials": {s: i for i, s in enumerate(SPECIALS)}},
            "vocab_size": VOCAB_SIZE,
            **ref,
            "data": part_b(model, tok, ids),
        }
        save_file(tensors, model_dir / "reference.safetensors", metadata=META)
        write_json(model_dir / "reference.json", ref)
        print(f"{name}: forward loss {ref['forward']['loss']:.5f}, eval loss {ref['data']['eval_loss']:.5f} "
              f"over {ref['data']['eval_tokens']} tokens, generate stops at EOS: "
              f"{[g['stopped_at_eos'] for g in ref['generate']]}", flush=True)
        if name in PEFT_MODELS:
            arch = "gpt2" if model.config.model_type == "gpt2" else "llama"
            part_c(name, model_dir, tok, ids, arch, SEED + 1000 + 10 * mi)
        for rel, content in kept.items():
            if (model_dir / rel).parent.is_dir():
                (model_dir / rel).write_bytes(content)
        for rel, content in others.items():
            (model_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (model_dir / rel).write_bytes(content)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check-adapter", metavar="DIR", help="adapter folder to evaluate (check mode)")
    ap.add_argument("--model", choices=PEFT_MODELS + ["tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3"],
                    help="check mode: base model (the last four: peft/ by generate_more.py)")
    ap.add_argument("--case", choices=PEFT_METHODS, help="check mode: the case whose step batch to use")
    ap.add_argument("--json", metavar="OUT", help="check mode: also write the result here")
    args = ap.parse_args()
    if args.check_adapter:
        args.check_adapter = str(Path(args.check_adapter).resolve())
    os.chdir(ROOT)
    versions = check_versions()
    setup_torch()
    if args.check_adapter:
        if not (args.model and args.case):
            ap.error("--check-adapter needs --model and --case")
        check_adapter(args)
    else:
        generate_all(versions)


if __name__ == "__main__":
    main()
