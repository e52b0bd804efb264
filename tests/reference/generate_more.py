#!/usr/bin/env python3
"""More reference data, with generate.py's machinery: two more tiny models, KV-cached logits, more PEFT cases.

    ~/.cache/wgtune-ref/venv/bin/python tests/reference/generate_more.py [--only PART,...]

PARTs (default: all, in this order):
  models   data/tiny-qwen3/ and data/tiny-gemma3/: everything generate.py writes for its models
           (config.json, model.safetensors, tokenizer files, generation_config.json, reference.safetensors,
           reference.json); tiny-gemma3 also gets tokenizer.model (SentencePiece), config.hub.json
           (the transformers 4.5x / Hub spelling, checked to load to identical logits) and prefix_window.json
           (what PEFT prefix tuning does with Gemma 3's sliding window, measured).
  kv       data/<model>/kv_reference.safetensors (+ kv_reference.json) for all six models: the per-step logits
           of transformers' KV-cached generate(output_logits=True) for generate case 0.
  peft     data/<model>/peft/<method>/ for tiny-mistral, tiny-qwen2, tiny-qwen3, tiny-gemma3 (generate.py's
           part_c, all six PEFT_METHODS).
Existing files of tiny-llama, tiny-gpt2, tiny-qwen2 and tiny-mistral are never rewritten (only
kv_reference.* and, for qwen2/mistral, peft/ are added).

Same rules as generate.py: CPU, float32, one thread, fixed seeds, eager attention, same versions.

Chat templates (copied verbatim):
  * tiny-qwen3: Qwen3's template (the one with <think> handling and `enable_thinking`), from llama.cpp's
    models/templates/Qwen-Qwen3-0.6B.jinja (as stored in the ye-NX/llama.cpp fork at commit
    b354d7c9ecb76c97c07098617cdebbdfffa2583e), the template of Qwen/Qwen3-0.6B's tokenizer_config.json.
  * tiny-gemma3: Gemma 3's template, `_CHAT_TEMPLATE` in huggingface/transformers
    src/transformers/models/gemma3/convert_gemma3_weights.py (commit 0d7e95d96b4e187c651e2b2406ed98ed40d74963),
    the template the conversion writes into Gemma 3 checkpoints.
"""

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate as G  # noqa: E402

import torch  # noqa: E402
import sentencepiece as spm  # noqa: E402
from safetensors.torch import save_file, load_file  # noqa: E402
from tokenizers import AddedToken, Tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM, Gemma3TextConfig, GemmaTokenizer, Qwen3Config  # noqa: E402
from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor  # noqa: E402

QWEN3_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

# name -> (tokenizer flavour, pre-tokenizer, saved dtype, seed index). The seed index continues generate.py's
# MODELS order (model seed SEED + 10*i, PEFT seed SEED + 1000 + 10*i).
NEW_MODELS = {
    "tiny-qwen3": ("llama", "qwen2", torch.float32, 4),
    "tiny-gemma3": ("gemma", "sentencepiece", torch.bfloat16, 5),
}
# Model seeds that differ from SEED + 10*i. A random Gemma with tied, sqrt(hidden)-scaled embeddings mostly
# repeats its last input token under greedy decoding; seed 1287 (of 1284-1319 tried) gives a continuation that
# changes token 5 times, late steps included, so the sliding window matters for which token wins.
MODEL_SEED = {"tiny-gemma3": 1287}
ALL_MODELS = list(G.MODELS) + list(NEW_MODELS)
SEED_INDEX = {**{n: i for i, n in enumerate(G.MODELS)}, **{n: v[3] for n, v in NEW_MODELS.items()}}
PEFT_MORE = ["tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3"]

GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
GEMMA_VOCAB = 400
SLIDING_WINDOW = 4


# ----------------------------------------------------------------------------- tokenizers


def write_qwen3_tokenizer(model_dir):
    ids = G.write_tokenizer(model_dir, "llama", "qwen2")
    p = model_dir / "tokenizer_config.json"
    cfg = json.loads(p.read_text())
    cfg["chat_template"] = QWEN3_CHAT_TEMPLATE
    G.write_json(p, cfg)
    return ids


def train_gemma_spm():
    """A Gemma-style SentencePiece BPE: byte fallback, no dummy prefix, identity normalization, split digits,
    whitespace kept; <pad> 0, <eos> 1, <bos> 2, <unk> 3, <start_of_turn> 4, <end_of_turn> 5 (user-defined)."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(G.CORPUS), model_writer=buf, model_type="bpe", vocab_size=GEMMA_VOCAB,
        character_coverage=1.0, byte_fallback=True, split_digits=True, add_dummy_prefix=False,
        remove_extra_whitespaces=False, normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=GEMMA_SPECIALS[4:], num_threads=1, minloglevel=2,
        max_sentencepiece_length=16,
    )
    return buf.getvalue()


def write_gemma_tokenizer(model_dir):
    proto = train_gemma_spm()
    (model_dir / "tokenizer.model").write_bytes(proto)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    assert sp.get_piece_size() == GEMMA_VOCAB
    for i, s in enumerate(GEMMA_SPECIALS):
        assert sp.id_to_piece(i) == s, (i, sp.id_to_piece(i))
    # transformers 5's own SentencePiece -> tokenizers conversion for Gemma (GemmaTokenizer is the fast one).
    vocab, _, merges = SentencePieceExtractor(str(model_dir / "tokenizer.model")).extract()
    tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False, mask_token=None)
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(s, special=True, normalized=False)
                                                          for s in GEMMA_SPECIALS[4:]]})
    tok._tokenizer.save(str(model_dir / "tokenizer.json"))
    added = {
        str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, s in enumerate(GEMMA_SPECIALS)
    }
    cfg = {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": None,
        "add_bos_token": True, "add_eos_token": False,
        "additional_special_tokens": GEMMA_SPECIALS[4:],
        "clean_up_tokenization_spaces": False, "spaces_between_special_tokens": False,
        "model_max_length": 128, "added_tokens_decoder": added, "chat_template": GEMMA3_CHAT_TEMPLATE,
    }
    G.write_json(model_dir / "tokenizer_config.json", cfg)
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return {"bos": 2, "eos": 1, "pad": 0, "gen_eos": [1, raw.token_to_id("<end_of_turn>")]}, sp


# ----------------------------------------------------------------------------- models


def make_config(name, ids):
    common = dict(vocab_size=G.VOCAB_SIZE if name != "tiny-gemma3" else GEMMA_VOCAB, bos_token_id=ids["bos"],
                  eos_token_id=ids["eos"], pad_token_id=ids["pad"], initializer_range=0.1,
                  max_position_embeddings=128, attention_dropout=0.0)
    if name == "tiny-qwen3":
        return Qwen3Config(
            **common, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=24, intermediate_size=96, tie_word_embeddings=False, attention_bias=False,
            rms_norm_eps=1e-6, rope_theta=1000000.0, use_sliding_window=False,
        )
    if name == "tiny-gemma3":
        return Gemma3TextConfig(
            **common, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=96, rms_norm_eps=1e-6,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            sliding_window=SLIDING_WINDOW, query_pre_attn_scalar=24,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
            tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh",
            final_logit_softcapping=None, attn_logit_softcapping=None,
        )
    raise ValueError(name)


def randomize_norms(gemma):
    """Every RMSNorm weight random: Gemma's norms scale by (1 + w) with w initialized to 0, so w = N(0, 0.1^2);
    the others scale by w, so w = 1 + N(0, 0.1^2). Drawn from the global (seeded) generator."""
    def hook(model):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n:
                    assert p.dim() == 1, n
                    noise = torch.randn(p.shape) * 0.1
                    p.copy_(noise if gemma else 1.0 + noise)
    return hook


def hub_gemma_config(model_dir):
    """config.json rewritten the way Hub Gemma 3 checkpoints (transformers 4.5x) spell it."""
    cfg = json.loads((model_dir / "config.json").read_text())
    rp = cfg.pop("rope_parameters")
    lt = cfg.pop("layer_types")
    cfg["rope_theta"] = rp["full_attention"]["rope_theta"]
    cfg["rope_local_base_freq"] = rp["sliding_attention"]["rope_theta"]
    scaling = {k: v for k, v in rp["full_attention"].items() if k != "rope_theta"}
    cfg["rope_scaling"] = scaling
    # Gemma 3 1B's config.json spells the layer pattern this way: layer i is full iff (i + 1) % pattern == 0.
    pattern = 2
    assert lt == ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(len(lt))]
    cfg["sliding_window_pattern"] = pattern
    cfg["cache_implementation"] = "hybrid"
    cfg.pop("_sliding_window_pattern", None)  # transformers 5 writes its default 6 there; layer_types decide
    cfg["torch_dtype"] = cfg.pop("dtype")
    G.write_json(model_dir / "config.hub.json", dict(sorted(cfg.items())))
    # It must load to the same model: same layer types, same RoPE, identical logits.
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shutil.copy(model_dir / "config.hub.json", tmp / "config.json")
        shutil.copy(model_dir / "model.safetensors", tmp / "model.safetensors")
        hub = G.load_base(tmp)
    ref = G.load_base(model_dir)
    assert hub.config.layer_types == ref.config.layer_types, hub.config.layer_types
    assert hub.config.rope_parameters == ref.config.rope_parameters, hub.config.rope_parameters
    x = torch.arange(5, 45).reshape(2, 20)
    with torch.no_grad():
        assert torch.equal(hub(input_ids=x).logits, ref(input_ids=x).logits)


def spm_crosscheck(sp, tok):
    """transformers' tokenizer.json vs the SentencePiece model itself (with BOS), on the tokenization strings."""
    out = []
    for s in G.TOKENIZATION_STRINGS:
        a = tok(s, add_special_tokens=True).input_ids
        b = [2] + sp.encode(s)
        if a != b:
            out.append({"text": s, "transformers": a, "sentencepiece": b})
    return out


def build_new_model(name, versions):
    flavour, pretok, save_dtype, si = NEW_MODELS[name]
    model_dir = G.DATA_REL / name
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
    sp = None
    if name == "tiny-gemma3":
        ids, sp = write_gemma_tokenizer(model_dir)
        specials = {s: i for i, s in enumerate(GEMMA_SPECIALS)}
        vocab = GEMMA_VOCAB
    else:
        ids = write_qwen3_tokenizer(model_dir)
        specials = {s: i for i, s in enumerate(G.SPECIALS)}
        vocab = G.VOCAB_SIZE
    cfg = make_config(name, ids)
    model = G.build_model(name, model_dir, ids, save_dtype, MODEL_SEED.get(name, G.SEED + 10 * si), cfg=cfg,
                          post_init=randomize_norms(name == "tiny-gemma3"))
    tok = G.load_tok(model_dir)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (ids["bos"], ids["eos"], ids["pad"])
    assert len(tok) == vocab, len(tok)
    raw_tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tensors, ref = G.part_a(name, model, tok, raw_tok, ids)
    ref = {
        "model": name, "arch": model.config.model_type, "tokenizer_flavour": flavour,
        "pre_tokenizer": pretok, "transformers_tokenizer_class": type(tok).__name__,
        "weights_dtype": str(save_dtype).replace("torch.", ""),
        "versions": versions,
        "ids": {"bos": ids["bos"], "eos": ids["eos"], "pad": ids["pad"], "generation_eos": ids["gen_eos"],
                "specials": specials},
        "vocab_size": vocab,
        **ref,
        "data": G.part_b(model, tok, ids),
    }
    # Qwen3's template: the thinking switch (a second rendering, with enable_thinking=False).
    if name == "tiny-qwen3":
        r = tok.apply_chat_template(G.CHAT_MESSAGES, add_generation_prompt=True, tokenize=False,
                                    enable_thinking=False)
        ref["chat_enable_thinking_false"] = {"rendered": r, "ids": tok(r, add_special_tokens=False).input_ids}
    if sp is not None:
        ref["sentencepiece_disagree"] = spm_crosscheck(sp, tok)
    gens = [len(g["prompt_ids"]) + len(g["greedy_ids"]) for g in ref["generate"]]
    if name == "tiny-gemma3":
        assert max(gens) > SLIDING_WINDOW + 1
        ref["sliding_window"] = {
            "window": SLIDING_WINDOW,
            "mask_rule": "key j is visible to query i iff j <= i and i - j < sliding_window "
                         "(transformers masking_utils.sliding_window_overlay: kv_idx > q_idx - sliding_window)",
            "layer_types": model.config.layer_types,
            "embed_scale": "hidden_size**0.5 = 8.0, a float32 buffer cast to the weight dtype in forward",
            "attention_scale": "query_pre_attn_scalar**-0.5 = 24**-0.5 (not head_dim**-0.5)",
        }
    G.save_file(tensors, model_dir / "reference.safetensors", metadata=G.META)
    G.write_json(model_dir / "reference.json", ref)
    if name == "tiny-gemma3":
        hub_gemma_config(model_dir)
    print(f"{name}: forward loss {ref['forward']['loss']:.5f}, eval loss {ref['data']['eval_loss']:.5f} "
          f"over {ref['data']['eval_tokens']} tokens, generate stops at EOS: "
          f"{[g['stopped_at_eos'] for g in ref['generate']]}, prompt+new lengths {gens}", flush=True)


# ----------------------------------------------------------------------------- KV-cached logits


def model_ids(name):
    ref = json.loads((G.DATA_REL / name / "reference.json").read_text())
    i = ref["ids"]
    return {"bos": i["bos"], "eos": i["eos"], "pad": i["pad"], "gen_eos": i["generation_eos"]}, ref


def kv_reference(name):
    model_dir = G.DATA_REL / name
    ids, ref = model_ids(name)
    model = G.load_base(model_dir)
    case = ref["generate"][0]
    pid = case["prompt_ids"]
    x = torch.tensor([pid])
    with torch.no_grad():
        out = model.generate(
            x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=G.MAX_NEW_TOKENS,
            eos_token_id=ids["gen_eos"], pad_token_id=ids["pad"], output_logits=True,
            return_dict_in_generate=True,
        )
    new = out.sequences[0, len(pid):].tolist()
    assert new == case["greedy_ids"], (name, new, case["greedy_ids"])
    logits = torch.cat([l.float() for l in out.logits], 0)  # [steps, V]
    assert logits.shape[0] == len(new)
    # The same steps without a cache: one full forward over prompt + generated ids.
    with torch.no_grad():
        full = model(input_ids=torch.tensor([pid + new[:-1]])).logits[0, len(pid) - 1:]
    diff = (logits - full).abs().max().item()
    assert diff < 1e-4, (name, diff)
    save_file({"prompt_ids": G.i32(pid), "generated_ids": G.i32(new), "logits": G.f32(logits),
               "full_forward_logits": G.f32(full)}, model_dir / "kv_reference.safetensors", metadata=G.META)
    pkv = out.past_key_values
    cache = type(pkv).__name__
    layers = [type(l).__name__ for l in getattr(pkv, "layers", [])]
    G.write_json(model_dir / "kv_reference.json", {
        "case": "generate[0]", "prompt": case["prompt"], "prompt_len": len(pid), "steps": len(new),
        "max_new_tokens": G.MAX_NEW_TOKENS, "eos_token_id": ids["gen_eos"],
        "cache_class": cache, "cache_layer_classes": layers,
        "max_abs_diff_cached_vs_full_forward": diff,
        "note": "logits[s] = generate(output_logits=True) step s (the raw logits that picked generated_ids[s]); "
                "full_forward_logits[s] = one uncached forward over prompt + generated_ids[:-1], position P-1+s",
    })
    print(f"{name}: kv cached logits, {len(new)} steps, cache {cache}, max |cached - full| {diff:.3g}", flush=True)


# ----------------------------------------------------------------------------- PEFT


def peft_cases(name):
    model_dir = G.DATA_REL / name
    ids, ref = model_ids(name)
    tok = G.load_tok(model_dir)
    kept = {p.relative_to(model_dir): p.read_bytes() for p in model_dir.glob("peft/*/wgtune_check.json")}
    G.part_c(name, model_dir, tok, ids, "llama", G.SEED + 1000 + 10 * SEED_INDEX[name])
    for rel, content in kept.items():
        if (model_dir / rel).parent.is_dir():
            (model_dir / rel).write_bytes(content)


# ----------------------------------------------------------------------------- Gemma 3 prefix + sliding window


def prefix_window_experiment():
    """What PEFT prefix tuning does with Gemma 3's sliding-window layers, measured on tiny-gemma3.

    Perturb one prefix row j of the LAST layer only (a sliding layer: its output at position t reaches the logits
    at t alone) and record which input positions' logits change."""
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    name = "tiny-gemma3"
    model_dir = G.DATA_REL / name
    P, T = 6, 8
    base = G.load_base(model_dir)
    cfg = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P, prefix_projection=False)
    torch.manual_seed(G.SEED + 7)
    model = get_peft_model(base, cfg)
    model.eval()
    emb = model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        emb.copy_(torch.randn(emb.shape) * 0.1)
    L = model.peft_config["default"].num_layers
    td = model.peft_config["default"].token_dim
    last = L - 1
    x = torch.arange(10, 10 + T)[None]
    mask = torch.ones_like(x)

    def run():
        with torch.no_grad():
            return model(input_ids=x, attention_mask=mask).logits[0]

    seen_positions = []
    rotary = model.get_base_model().model.rotary_emb
    hook = rotary.register_forward_hook(lambda mod, args, out: seen_positions.append(args[1][0].tolist()))
    run()
    hook.remove()
    assert seen_positions and all(p == list(range(P, P + T)) for p in seen_positions), seen_positions
    cache = model.get_prompt(batch_size=1)
    layer_classes = [type(l).__name__ for l in cache.layers]
    layer_kv_len = [int(l.keys.shape[-2]) for l in cache.layers]
    base_logits = run()
    rows = {}
    for j in range(P):
        saved = emb.detach().clone()
        with torch.no_grad():
            # columns of layer `last`: K at block 2*last, V at block 2*last+1 (each td wide)
            emb[j, 2 * last * td:(2 * last + 2) * td] += 1.0
        changed = ((run() - base_logits).abs().max(-1).values > 1e-6).nonzero().flatten().tolist()
        with torch.no_grad():
            emb.copy_(saved)
        expected = [i for i in range(T) if (P + i) - j < SLIDING_WINDOW]
        rows[str(j)] = {"changed_positions": changed, "expected_if_prefix_at_positions_0_to_P-1": expected}
        assert changed == expected, (j, changed, expected)
    # The prefix in the full-attention layer (layer 1) is seen by every position.
    saved = emb.detach().clone()
    with torch.no_grad():
        emb[0, 2 * 1 * td:(2 * 1 + 2) * td] += 1.0
    full_changed = ((run() - base_logits).abs().max(-1).values > 1e-6).nonzero().flatten().tolist()
    with torch.no_grad():
        emb.copy_(saved)
    assert full_changed == list(range(T)), full_changed
    res = {
        "model": name, "num_virtual_tokens": P, "input_len": T, "sliding_window": SLIDING_WINDOW,
        "layer_types": base.config.layer_types,
        "peft_cache": "DynamicCache(config=base_config) (peft_model.get_prompt, gemma3_text branch, transformers >= 4.56)",
        "cache_layer_classes": layer_classes,
        "cache_layer_kv_len_after_prefix": layer_kv_len,
        "input_rope_positions": seen_positions[0],
        "finding": "The prefix rows take positions 0..P-1 and the inputs P..P+T-1 (RoPE of the inputs starts at P, "
                   "checked; the prefix keys are put into the cache as they are: no k_norm, no RoPE). In a sliding layer, input i (position P+i) sees prefix row j iff "
                   "(P+i) - j < sliding_window, the ordinary window rule; DynamicSlidingWindowLayer keeps only the last "
                   "sliding_window-1 prefix rows, which changes nothing since the older ones are out of every window. "
                   "Full-attention layers see every prefix row from every position.",
        "last_layer_row_perturbation": rows,
        "full_layer_row0_changed_positions": full_changed,
    }
    G.write_json(model_dir / "prefix_window.json", res)
    print(f"{name}: prefix/window semantics verified: {rows}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="models,kv,peft,prefix",
                    help="comma list of parts: models, kv, peft, prefix (default all)")
    ap.add_argument("--models", default=None, help="comma list restricting the models of a part")
    args = ap.parse_args()
    os.chdir(G.ROOT)
    versions = G.check_versions()
    G.setup_torch()
    parts = args.only.split(",")
    pick = (lambda ms: [m for m in ms if m in args.models.split(",")]) if args.models else (lambda ms: ms)
    if "models" in parts:
        for name in pick(list(NEW_MODELS)):
            build_new_model(name, versions)
    if "prefix" in parts:
        prefix_window_experiment()
    if "kv" in parts:
        for name in pick(ALL_MODELS):
            kv_reference(name)
    if "peft" in parts:
        for name in pick(PEFT_MORE):
            peft_cases(name)


if __name__ == "__main__":
    main()
