#!/usr/bin/env python3
"""Tokenizer and chat-template reference data for wgtune's 2026 model families (Gemma 3, Qwen3).

Run from anywhere (the script changes to the repository root):

    ~/.cache/wgtune-ref/venv/bin/python tests/reference/tokenizers_generate.py

It rewrites tests/reference/data/tokenizers/ deterministically. Versions as gguf_generate.py (whose
corpus, BPE vocabulary and GGUF helpers it imports).

Outputs:
  tok-gemma.gguf          vocab-only Gemma-style SentencePiece file (tokenizer.ggml.model "llama",
                          general.architecture "gemma3"), written with the metadata llama.cpp's converter
                          writes for Gemma 3 (conversion/base.py `_create_vocab_sentencepiece` +
                          conversion/gemma.py `Gemma3Model.set_vocab`: add_space_prefix false; user-defined
                          tokens from tokenizer_config's added_tokens_decoder respelled with " " for "▁",
                          score -1000; special added tokens typed CONTROL), plus the Gemma 3 chat template
  tok-gemma-eos.gguf      the same with add_bos_token false, add_eos_token true
  tok-default.gguf        byte-level BPE (gguf_generate.py's vocabulary) with tokenizer.ggml.pre "default"
  tok-default-bos-eos.gguf  the same with add_bos_token and add_eos_token true
  tokens.json             per file: ids of every HARD_TEXTS string (add_special_tokens=True), their
                          tokens, and the decoded text of the ids without BOS/EOS
  lora_targets.json       per tiny model in tests/reference/data (all six families): PEFT's target_modules for LoraConfig()
                          without target_modules (its TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
                          default) and with "all-linear", as get_peft_model resolves them, plus the mapping
                          entries for the 2026 families
  chat.json               conversations rendered by transformers' apply_chat_template with gemma3.jinja
                          (the GemmaTokenizer's specials) and qwen3.jinja
  gemma3.jinja            the Gemma 3 chat template, as unslothai/unsloth unsloth/chat_templates.py
                          (commit 0050c73e05ca9bb74e42d0649be410f177160c08, `gemma3_template`) reproduces
                          google/gemma-3-*-it's tokenizer.chat_template
  qwen3.jinja             the Qwen3 chat template, ggml-org/llama.cpp models/templates/Qwen-Qwen3-0.6B.jinja
                          (as vendored in the llama-cpp-python 0.3.36 sdist), Qwen/Qwen3-0.6B's template

Where each value comes from:
  * Gemma ids: transformers' GemmaTokenizer converted from the same tokenizer.model (GemmaConverter:
    normalizer Replace(" ", "▁"), no prefix space, BPE with byte fallback, <start_of_turn>/<end_of_turn>
    special). The file's vocabulary is what llama.cpp's converter would write from that folder.
  * default-pre ids: llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEFAULT (src/llama-vocab.cpp, `default:` case of
    llm_tokenizer_bpe): the regexes
        [\\p{P}\\$\\+<=>\\^~\\|]+
        's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)
        \\p{N}+
        [0-9][0-9][0-9]
    applied one after the other, each splitting the previous pieces into matches and the text between
    them (unicode_regex_split), special tokens split off first (tokenizer_st_partition); each piece is
    byte-level encoded and BPE'd with the file's merges (tokenizers' BPE model, which this script only
    uses for the merges). The split is our own Python (`regex` module) reading of llama.cpp's, not
    llama.cpp itself, which this environment does not build.
  * add_bos/add_eos: llama.cpp prepends BOS / appends EOS when the file's flags say so; for Gemma the
    GemmaTokenizer with the same add_bos_token/add_eos_token.
"""

import io
import os
import sys
import tempfile
from pathlib import Path

import regex
import sentencepiece as spm
from gguf import GGUFReader, TokenType
from tokenizers import Tokenizer, decoders, models
from transformers import GemmaTokenizer
from transformers.utils.chat_template_utils import render_jinja_template

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gguf_generate as gg  # noqa: E402
from generate import write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT_REL = Path("tests/reference/data/tokenizers")

HARD_TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    " leading space",
    "  two leading spaces and  double   triple    four",
    "trailing spaces   ",
    "line one\nline two\n\nline four\n\n\n",
    "\n\nstarts with newlines",
    "tabs\tand\t\ttwo tabs\r\nwindows",
    "emoji: 😀 👍🏽 🏳️‍🌈 ok🎉",
    "東京は日本の首都です。你好，世界",
    "한국어 텍스트입니다.",
    "In 2024, 12345 + 678 = 13023; 1234567 and 0.5",
    "Prices: $19.99, 50% off <=> a^b ~c |d| #tag @user",
    "I'M sure we've got it, don't you? She'd say it's fine.",
    "Café naïve résumé — Ångström",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "a<bos>b<eos>c",
    "",
    " ",
    "x",
    "a\n\n\n\nb   \n  \n",
    "non\u00a0breaking and\u3000ideographic spaces",
]

GEMMA_VOCAB_SIZE = 600
# Gemma's specials and turn markers: <pad>=0 <eos>=1 <bos>=2 <unk>=3, then user-defined pieces.
GEMMA_USER_DEFINED = ["<start_of_turn>", "<end_of_turn>", "\n\n", "▁▁", "▁▁▁▁"]
GEMMA_SPECIAL = {"<start_of_turn>", "<end_of_turn>"}

DEFAULT_PRE_REGEXES = [
    r"[\p{P}\$\+<=>\^~\|]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
]

CONVERSATIONS = [
    {"name": "single", "messages": [{"role": "user", "content": "Hello there!"}]},
    {"name": "system", "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "  What is 2+2?  "},
    ]},
    {"name": "multi", "messages": [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke.\n"},
    ]},
    {"name": "history", "messages": [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2 done"},
    ]},
    # Qwen3: reasoning in assistant content; the template keeps it only after the last user turn.
    {"name": "system-only", "messages": [{"role": "system", "content": "Only a system prompt."}]},
    # Qwen3 only (Gemma 3 has no tool role): tool results fold into user turns; a user turn that is
    # a <tool_response> does not count as the last query.
    {"name": "tool", "qwen3_only": True, "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "<think>\ncall it\n</think>\n\nChecking."},
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "22C"},
        {"role": "user", "content": "<tool_response>\nlate\n</tool_response>"},
        {"role": "assistant", "content": "<think>\nsummarize\n</think>\n\nSunny, 22C."},
    ]},
    # Reasoning after the last user turn is kept even when empty; before it, dropped.
    {"name": "think-last", "messages": [
        {"role": "system", "content": "Think first."},
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "<think>\n\n</think>\n\nBecause."},
    ]},
    {"name": "think", "messages": [
        {"role": "user", "content": "First?"},
        {"role": "assistant", "content": "<think>\nold reasoning\n</think>\n\nFirst answer."},
        {"role": "user", "content": "Second?"},
        {"role": "assistant", "content": "<think>\nnew reasoning\n</think>\n\nSecond answer."},
    ]},
]


def train_gemma_spm():
    lines = []
    for text in gg.CORPUS * gg.CORPUS_REPEAT:
        lines.extend(x for x in text.split("\n") if x.strip())
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=GEMMA_VOCAB_SIZE,
        byte_fallback=True,
        character_coverage=1.0,
        # Gemma's tokenizer.model: no normalization, no dummy prefix, whitespace-only pieces, digits split.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=GEMMA_USER_DEFINED,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def gemma_hf(model_bytes, tmp, add_bos=True, add_eos=False):
    d = Path(tmp) / f"gemma-{add_bos}-{add_eos}"
    d.mkdir(exist_ok=True)
    (d / "tokenizer.model").write_bytes(model_bytes)
    tok = GemmaTokenizer.from_pretrained(str(d), add_bos_token=add_bos, add_eos_token=add_eos)
    ids = tok("x", add_special_tokens=True)["input_ids"]
    assert (ids[0] == 2) == add_bos and (ids[-1] == 1) == add_eos, ids
    return tok


def gemma_gguf_vocab(model_bytes, hf):
    """llama.cpp conversion/base.py `_create_vocab_sentencepiece`, with the HF folder's
    tokenizer_config added_tokens_decoder as save_pretrained writes it."""
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    n = sp.vocab_size()
    tokens, scores, types = [], [], []
    for i in range(n):
        t = TokenType.NORMAL
        if sp.IsUnknown(i):
            t = TokenType.UNKNOWN
        elif sp.IsControl(i):
            t = TokenType.CONTROL
        elif sp.IsUnused(i):
            t = TokenType.UNUSED
        elif sp.IsByte(i):
            t = TokenType.BYTE
        tokens.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        types.append(t)
    # Gemma 3's tokenizer_config.json lists every added token in added_tokens_decoder, the named
    # specials and the turn markers with "special": true, the whitespace pieces false. transformers 5
    # no longer writes that key, so it is rebuilt here from the backend's added tokens by that rule.
    named = {"<pad>", "<eos>", "<bos>", "<unk>"} | GEMMA_SPECIAL
    cfg = {"added_tokens_decoder": {
        str(i): {"content": t.content, "special": t.content in named}
        for i, t in hf.backend_tokenizer.get_added_tokens_decoder().items() if i < n
    }}
    for tid, data in cfg["added_tokens_decoder"].items():
        tid = int(tid)
        token = data["content"]
        if data.get("special"):
            types[tid] = TokenType.CONTROL
        else:
            token = token.replace("▁", " ")
            types[tid] = TokenType.USER_DEFINED
        scores[tid] = -1000.0
        tokens[tid] = token
    return tokens, scores, types, cfg


def write_gemma(path, tokens, scores, types, add_bos, add_eos, template):
    def fill(w):
        w.add_name("wgtune tok-gemma")
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_add_space_prefix(False)
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_unk_token_id(3)
        w.add_pad_token_id(0)
        w.add_add_bos_token(add_bos)
        w.add_add_eos_token(add_eos)
        w.add_chat_template(template)

    gg.write_vocab_only(path, "gemma3", fill)


def gemma_cases(hf, bos, eos):
    cases = []
    for text in HARD_TEXTS:
        ids = hf(text, add_special_tokens=True)["input_ids"]
        body = [i for k, i in enumerate(ids) if not ((k == 0 and bos and i == 2) or
                                                        (k == len(ids) - 1 and eos and i == 1))]
        cases.append({"text": text, "ids": ids, "tokens": hf.convert_ids_to_tokens(ids),
                      "decoded": hf.decode(body, skip_special_tokens=False)})
    return cases


def default_pre_split(text):
    pieces = [text]
    for pat in DEFAULT_PRE_REGEXES:
        out = []
        for p in pieces:
            last = 0
            for m in regex.finditer(pat, p):
                if m.start() > last:
                    out.append(p[last:m.start()])
                if m.end() > m.start():
                    out.append(m.group())
                last = m.end()
            if last < len(p):
                out.append(p[last:])
        pieces = out
    return pieces


def default_pre_ids(tokens, merges, text):
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges]))
    b2u = bytes_to_unicode()
    specials = gg.SPECIALS
    # tokenizer_st_partition: special tokens first, leftmost, longest.
    parts = regex.split("(" + "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")",
                        text)
    ids = []
    for part in parts:
        if not part:
            continue
        if part in specials:
            ids.append(vocab[part])
            continue
        for piece in default_pre_split(part):
            mapped = "".join(b2u[b] for b in piece.encode("utf-8"))
            ids.extend(t.id for t in bpe.model.tokenize(mapped))
    return ids


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def write_default(path, tokens, merges, add_bos, add_eos):
    """gguf_generate.add_bpe_vocab with tokenizer.ggml.pre "default" and the given add_bos/add_eos."""
    def fill(w):
        w.add_name("wgtune tok-default")
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types(gg.bpe_token_types(tokens))
        w.add_token_merges(merges)
        w.add_bos_token_id(gg.BPE_IDS["bos"])
        w.add_eos_token_id(gg.BPE_IDS["eos"])
        w.add_pad_token_id(gg.BPE_IDS["pad"])
        w.add_add_bos_token(add_bos)
        w.add_add_eos_token(add_eos)
        w.add_chat_template(gg.CHAT_TEMPLATE)

    gg.write_vocab_only(path, "llama", fill)


def default_cases(tokens, merges, add_bos, add_eos):
    # The texts must tell the default split from GPT-2's (digit groups, punctuation runs).
    gpt2 = DEFAULT_PRE_REGEXES[1] + r"|\s+"
    differ = [t for t in HARD_TEXTS if default_pre_split(t) != regex.findall(gpt2, t)]
    assert len(differ) >= 3, differ
    cases = []
    dec = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                               merges=[tuple(m.split(" ")) for m in merges]))
    dec.decoder = decoders.ByteLevel()
    for text in HARD_TEXTS:
        body = default_pre_ids(tokens, merges, text)
        ids = ([gg.BPE_IDS["bos"]] if add_bos else []) + body + ([gg.BPE_IDS["eos"]] if add_eos else [])
        cases.append({"text": text, "ids": ids, "tokens": [tokens[i] for i in ids],
                      "decoded": dec.decode(body, skip_special_tokens=False)})
    return cases


GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{ '<start_of_turn>model\\n' }}\n"
    "{%- endif -%}\n"
)


def render(template, messages, gen, specials):
    out, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                   add_generation_prompt=gen, **specials)
    return out[0]


def lora_targets():
    import peft
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping

    torch.manual_seed(0)
    out = {"peft": peft.__version__, "mapping": {}, "models": {}}
    for mt in ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2"]:
        out["mapping"][mt] = sorted(mapping[mt])
    for name in ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gpt2", "tiny-qwen3", "tiny-gemma3"]:
        entry = {}
        for key, targets in [("default", None), ("all-linear", "all-linear")]:
            model = AutoModelForCausalLM.from_pretrained(str(ROOT / "tests/reference/data" / name))
            pm = get_peft_model(model, LoraConfig(r=2, target_modules=targets))
            entry[key] = sorted(pm.peft_config["default"].target_modules)
        entry["model_type"] = model.config.model_type
        out["models"][name] = entry
    return out


def main():
    gg.check_versions()
    os.chdir(ROOT)
    out = OUT_REL
    # qwen3.jinja is committed as copied from its source (see the docstring); everything else is ours.
    qwen3 = out / "qwen3.jinja"
    for p in out.iterdir():
        if p != qwen3:
            p.unlink()
    (out / "gemma3.jinja").write_text(GEMMA3_TEMPLATE)

    result = {}
    model_bytes = train_gemma_spm()
    with tempfile.TemporaryDirectory() as tmp:
        hf = gemma_hf(model_bytes, tmp)
        tokens, scores, types, cfg = gemma_gguf_vocab(model_bytes, hf)
        for name, (bos, eos) in {"tok-gemma.gguf": (True, False), "tok-gemma-eos.gguf": (False, True)}.items():
            write_gemma(out / name, tokens, scores, types, bos, eos, GEMMA3_TEMPLATE)
            r = GGUFReader(str(out / name))
            assert gg.field_value(r, "tokenizer.ggml.tokens") == tokens
            h = hf if (bos, eos) == (True, False) else gemma_hf(model_bytes, tmp, bos, eos)
            result[name] = {
                "model": "llama", "add_bos": bos, "add_eos": eos,
                "reference": "transformers GemmaTokenizer from the same tokenizer.model",
                "added_tokens_decoder": {k: v["content"] for k, v in cfg["added_tokens_decoder"].items()},
                "cases": gemma_cases(h, bos, eos),
            }
        gemma_specials = {"bos_token": hf.bos_token, "eos_token": hf.eos_token,
                          "pad_token": hf.pad_token, "unk_token": hf.unk_token}

    bpe_tokens, bpe_merges = gg.train_bpe()
    for name, (bos, eos) in {"tok-default.gguf": (False, False),
                             "tok-default-bos-eos.gguf": (True, True)}.items():
        write_default(out / name, bpe_tokens, bpe_merges, bos, eos)
        tokens_back, merges_back, _, pre = gg.read_bpe_file(out / name)
        assert tokens_back == bpe_tokens and merges_back == bpe_merges and pre == "default"
        result[name] = {
            "model": "gpt2", "add_bos": bos, "add_eos": eos,
            "reference": "llama.cpp's default pre-tokenizer regexes (Python regex) + BPE merges",
            "cases": default_cases(bpe_tokens, bpe_merges, bos, eos),
        }
    write_json(out / "tokens.json", result)

    chat = {"gemma3": [], "qwen3": []}
    qwen_specials = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    for conv in CONVERSATIONS:
        for gen in (False, True):
            if not conv["name"].startswith("think") and not conv.get("qwen3_only"):
                chat["gemma3"].append({"name": conv["name"], "add_generation_prompt": gen,
                                       "messages": conv["messages"],
                                       "rendered": render(GEMMA3_TEMPLATE, conv["messages"], gen,
                                                          gemma_specials)})
            chat["qwen3"].append({"name": conv["name"], "add_generation_prompt": gen,
                                  "messages": conv["messages"],
                                  "rendered": render(qwen3.read_text(), conv["messages"], gen,
                                                     qwen_specials)})
    chat["specials"] = {"gemma3": gemma_specials, "qwen3": qwen_specials}
    write_json(out / "chat.json", chat)
    write_json(out / "lora_targets.json", lora_targets())
    for p in sorted(out.iterdir()):
        print(f"{p.stat().st_size:>9}  {p}")


if __name__ == "__main__":
    main()
