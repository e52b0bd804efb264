#!/usr/bin/env python3
"""GGUF exports of the six tiny folder models, written by llama.cpp's own convert_hf_to_gguf.py.

    tests/reference/get-llama-cpp-converter.sh        # once: the converter from the llama-cpp-python sdist
    ~/.cache/wgtune-ref/venv/bin/python tests/reference/gguf_families.py [--converter DIR]

DIR is the llama.cpp tree holding convert_hf_to_gguf.py, conversion/ and gguf-py/ (default: $WGTUNE_LLAMA_CPP,
else ~/.cache/wgtune-ref/llama-cpp-python/llama_cpp_python-<LLAMA_CPP_PYTHON>/vendor/llama.cpp). The converter
is run in this process with `--outtype f32`, so every weight is the folder's weight upcast to f32 (Gemma 3 norm
weights: plus 1.0, which the converter adds). Its own gguf-py is put first on sys.path, as the converter does.

The converter refuses BPE vocabularies whose pre-tokenizer hash it does not know (all of ours: they are trained
here). `TextModel.get_vocab_base_pre` is replaced by a function that returns the llama.cpp pre-tokenizer
name that matches each tokenizer's regex (PRE below); everything else is the converter's unchanged code.

Writes tests/reference/data/gguf/families/<model>.gguf and families.json (per file: source folder, converter
version, pre-tokenizer override, tensors with types and shapes, key metadata, and the cross-check of
transformers' GGUF loader against the folder where transformers supports the architecture).
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"
ROOT = Path(__file__).resolve().parents[2]
DATA_REL = Path("tests/reference/data")
OUT_REL = DATA_REL / "gguf" / "families"
MODELS = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-gpt2", "tiny-qwen3", "tiny-gemma3"]
# llama.cpp pre-tokenizer names (llama-vocab.cpp) matching each tokenizer.json's pre-tokenizer:
#   ByteLevel(use_regex=True), no digit split = the GPT-2 regex = llama.cpp "gpt-2";
#   Qwen2's Split regex + ByteLevel(use_regex=False) = "qwen2" (llama.cpp does not apply Qwen2's NFC).
# tiny-gemma3 has tokenizer.model: the converter's SentencePiece path, which asks for no pre-tokenizer.
PRE = {"tiny-llama": "gpt-2", "tiny-mistral": "gpt-2", "tiny-gpt2": "gpt-2", "tiny-qwen2": "qwen2",
       "tiny-qwen3": "qwen2", "tiny-gemma3": None}
# The converter's GPT2Model reads hparams["n_ctx"], which transformers 5's GPT2Config no longer writes (Hub gpt2
# configs have it, = n_positions): the conversion reads a copy of the folder with n_ctx added.
CONFIG_PATCH = {"tiny-gpt2": lambda c: {"n_ctx": c["n_positions"]}}
# transformers' GGUF loader: config values it does not read from the file, passed for a second cross-check.
CROSS_OVERRIDES = {
    "tiny-gpt2": {"n_positions": 128},
    "tiny-qwen3": {"head_dim": 24},
    "tiny-gemma3": {"query_pre_attn_scalar": 24,
                    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                    "rope_parameters": {
                        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "tiny-llama": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 32}},
}
CONFIG_KEYS = ("rope_parameters", "layer_types", "sliding_window", "query_pre_attn_scalar", "tie_word_embeddings",
               "rms_norm_eps", "head_dim", "n_positions", "max_position_embeddings")
NOTES = {
    "tiny-gemma3": [
        "The converter writes no layer pattern (gemma3.attention.sliding_window_pattern) and no "
        "query_pre_attn_scalar. llama.cpp's gemma3 loader (src/models/gemma3.cpp in the same sdist) then uses "
        "pattern 6 (layer il is sliding iff il % 6 < 5: all 3 layers sliding here, where the folder has "
        "sliding/full/sliding) and the attention scale 1/sqrt(head_dim) = 1/4 (1/sqrt(n_embd/n_head) for 27B), "
        "where the folder has 24**-0.5. Real Gemma 3 checkpoints have pattern 6 and query_pre_attn_scalar = "
        "head_dim (except 27B), so they are not affected; this tiny model is, on purpose: its GGUF read the "
        "llama.cpp way does NOT give the folder's logits.",
        "Norm weights are stored as the folder's w + 1.0 (Gemma3Model.norm_shift, in f32), for all norms "
        "including q_norm/k_norm; the reader must not add 1 again.",
        "Q/K are not permuted. token_embd is truncated to the SentencePiece vocabulary size (400 = no change).",
        "Vocabulary: tokenizer.ggml.model llama (SentencePiece) from tokenizer.model, pre 'default', "
        "add_space_prefix false, add_bos true; the chat template is the folder's.",
        "rope.freq_base is the full-attention theta (1e6), rope.freq_base_swa the sliding one (1e4); "
        "rope.scaling.type linear, factor 2.0 (llama.cpp applies it to full-attention layers only).",
        "Embedding scale: llama.cpp multiplies by sqrtf(n_embd) in f32 (src/models/gemma3.cpp); transformers by "
        "a float32 buffer sqrt(hidden) cast to the weight dtype (8.0 exactly here).",
    ],
    "tiny-llama": ["rope_freqs.weight (F32 [head_dim/2]) carries the llama3 rope scaling, as in Llama 3.1/3.2 "
                   "GGUFs; Q/K are permuted (LlamaModel.permute); tied: no output.weight."],
    "tiny-mistral": ["MistralForCausalLM converts as llama (general.architecture llama); BF16 weights upcast to "
                     "F32 exactly; Q/K permuted; untied: output.weight."],
    "tiny-qwen2": ["Three shards + index read as one model; q/k/v biases; not permuted."],
    "tiny-qwen3": ["head_dim 24 is in attention.key_length/value_length; q_norm/k_norm as attn_q_norm/attn_k_norm "
                   "[24]; not permuted. transformers' GGUF loader ignores key_length (builds head_dim 16 and "
                   "fails to load) unless head_dim is passed."],
    "tiny-gpt2": ["transformers 5 writes no n_ctx in GPT2Config; the converter needs it (config patch)."],
}
KEYS_OF_INTEREST = (
    "general.architecture", "general.file_type", "general.name",
    ".context_length", ".embedding_length", ".block_count", ".feed_forward_length",
    ".attention.head_count", ".attention.head_count_kv", ".attention.key_length", ".attention.value_length",
    ".attention.layer_norm_rms_epsilon", ".attention.layer_norm_epsilon", ".attention.sliding_window",
    ".attention.sliding_window_pattern", ".rope.freq_base", ".rope.freq_base_swa", ".rope.dimension_count",
    ".rope.scaling.type", ".rope.scaling.factor", ".vocab_size", ".final_logit_softcapping",
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_space_prefix",
)


def default_converter():
    env = os.environ.get("WGTUNE_LLAMA_CPP")
    if env:
        return Path(env)
    return (Path.home() / ".cache/wgtune-ref/llama-cpp-python" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
            / "vendor/llama.cpp")


def field_value(f):
    import gguf
    t = f.types[0]
    if t == gguf.GGUFValueType.ARRAY:
        sub = f.types[1]
        if sub == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    if t == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    v = f.parts[f.data[0]].tolist()[0]
    return v


def describe(path):
    import gguf
    r = gguf.GGUFReader(path)
    meta = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        if any(k == s or (s.startswith(".") and k.endswith(s)) for s in KEYS_OF_INTEREST):
            meta[k] = field_value(f)
    tok = {}
    for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        if k in r.fields:
            tok[k] = len(r.fields[k].data)
    tmpl = field_value(r.fields["tokenizer.chat_template"]) if "tokenizer.chat_template" in r.fields else None
    tensors = {t.name: {"type": t.tensor_type.name, "shape": [int(x) for x in t.shape]} for t in r.tensors}
    return r, meta, tok, tmpl, tensors


def layout_checks(name, reader, cfg):
    """How the converter laid out layer 0's q/k and the norms, checked against the folder's weights."""
    import numpy as np
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import generate as G
    sd = {k: v.float().numpy() for k, v in G.load_base(DATA_REL / name).state_dict().items()}
    t = {x.name: np.array(x.data).reshape([int(d) for d in reversed(x.shape)]) for x in reader.tensors}
    out = {}
    if name == "tiny-gpt2":
        w = sd["transformer.h.0.attn.c_attn.weight"]  # Conv1D [in, 3*out]
        out["attn_qkv"] = "transposed Conv1D [out, in]" if np.array_equal(t["blk.0.attn_qkv.weight"], w.T) else "?"
        return out
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def permute(w, n):  # llama.cpp LlamaModel.permute
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    for proj, g, n in (("q_proj", "attn_q", n_head), ("k_proj", "attn_k", n_kv)):
        w, x = sd[f"model.layers.0.self_attn.{proj}.weight"], t[f"blk.0.{g}.weight"]
        out[g] = ("as in the folder" if np.array_equal(x, w) else
                  "llama.cpp permute (rotate-half -> interleaved pairs)" if np.array_equal(x, permute(w, n)) else "?")
    norms = {"attn_norm": "model.layers.0.input_layernorm.weight", "output_norm": "model.norm.weight"}
    if name == "tiny-gemma3":
        norms.update({"attn_q_norm": "model.layers.0.self_attn.q_norm.weight",
                      "post_ffw_norm": "model.layers.0.post_feedforward_layernorm.weight"})
    elif name == "tiny-qwen3":
        norms["attn_q_norm"] = "model.layers.0.self_attn.q_norm.weight"
    for g, hf in norms.items():
        x = t["output_norm.weight" if g == "output_norm" else f"blk.0.{g}.weight"]
        w = sd[hf]
        out[g] = ("as in the folder" if np.array_equal(x, w) else
                  "folder + 1.0 (f32)" if np.array_equal(x, (torch.tensor(w) + 1.0).numpy()) else "?")
    return out


def crosscheck(name, gguf_path, report):
    """transformers' GGUF loader vs the folder: same logits? (only where transformers knows the architecture)"""
    import torch
    from transformers import AutoModelForCausalLM
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import generate as G
    folder = G.load_base(DATA_REL / name)
    x = torch.arange(5, 45).reshape(2, 20)
    with torch.no_grad():
        a = folder(input_ids=x).logits
    for label, overrides in (("", {}), ("_with_overrides", CROSS_OVERRIDES.get(name))):
        if overrides is None:
            continue
        key = "transformers_gguf" + label
        if overrides:
            report[key + "_config_overrides"] = overrides
        try:
            m = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32, attn_implementation="eager",
                                                     **overrides).eval()
        except Exception as e:  # noqa: BLE001
            report[key + "_load"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
            continue
        with torch.no_grad():
            b = m(input_ids=x).logits
        report[key + "_load"] = "ok"
        report[key + "_max_abs_logit_diff_vs_folder"] = (a - b).abs().max().item()
        fc, gc = folder.config.to_dict(), m.config.to_dict()
        report[key + "_config_diffs"] = {
            k: {"folder": fc.get(k), "gguf": gc.get(k)} for k in CONFIG_KEYS if fc.get(k) != gc.get(k)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--converter", type=Path, default=default_converter())
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    conv = args.converter.resolve()
    if not (conv / "convert_hf_to_gguf.py").is_file():
        sys.exit(f"no convert_hf_to_gguf.py in {conv}: run tests/reference/get-llama-cpp-converter.sh")
    os.chdir(ROOT)
    sys.path.insert(0, str(conv / "gguf-py"))
    sys.path.insert(0, str(conv))
    import gguf
    import convert_hf_to_gguf as conv_main
    from conversion import base as conv_base

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    torch.manual_seed(0)
    torch.set_num_threads(1)

    current = {}

    def get_vocab_base_pre(self, tokenizer):
        res = PRE[current["name"]]
        assert res is not None, current["name"]
        current["called"] = True
        return res

    conv_base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    gguf_py_version = next(l.split('"')[1] for l in (conv / "gguf-py/pyproject.toml").read_text().splitlines()
                           if l.startswith("version"))
    OUT_REL.mkdir(parents=True, exist_ok=True)
    out_path = OUT_REL / "families.json"
    families = json.loads(out_path.read_text()) if out_path.exists() else {}
    for name in args.models.split(","):
        src = DATA_REL / name
        dst = OUT_REL / f"{name}.gguf"
        current.clear()
        current["name"] = name
        config_patch = CONFIG_PATCH.get(name)
        if config_patch:
            # Convert a copy (same folder name, so the same general.name) whose config.json has the patch.
            tmp = Path(tempfile.mkdtemp()) / name
            shutil.copytree(src, tmp)
            c = json.loads((tmp / "config.json").read_text())
            c.update(config_patch(c))
            (tmp / "config.json").write_text(json.dumps(c, indent=2))
            conv_src = tmp
        else:
            conv_src = src
        sys.argv = ["convert_hf_to_gguf.py", str(conv_src), "--outtype", "f32", "--outfile", str(dst)]
        conv_main.main()
        if config_patch:
            shutil.rmtree(tmp.parent)
        r, meta, tok, tmpl, tensors = describe(dst)
        cfg = json.loads((src / "config.json").read_text())
        rep = {
            "source_folder": str(src),
            "converter": f"llama.cpp convert_hf_to_gguf.py from the llama-cpp-python {LLAMA_CPP_PYTHON} sdist "
                         f"(vendor/llama.cpp), its gguf-py {gguf_py_version}",
            "command": f"convert_hf_to_gguf.py {src} --outtype f32 --outfile {dst}",
            "pre_tokenizer_override": PRE[name] if current.get("called") else None,
            "config_patch_for_converter": config_patch(cfg) if config_patch else None,
            "sha256": hashlib.sha256(dst.read_bytes()).hexdigest(),
            "bytes": dst.stat().st_size,
            "metadata": meta,
            "tokenizer_arrays": tok,
            "chat_template_present": tmpl is not None,
            "chat_template_equals_folder": tmpl == json.loads((src / "tokenizer_config.json").read_text()).get(
                "chat_template"),
            "rope_freqs_present": "rope_freqs.weight" in tensors,
            "output_weight_present": "output.weight" in tensors,
            "tensors": tensors,
            "folder_config": {k: cfg.get(k) for k in ("model_type", "tie_word_embeddings", "layer_types",
                                                      "sliding_window", "query_pre_attn_scalar", "head_dim",
                                                      "rope_parameters", "rope_theta", "rope_scaling")
                              if k in cfg},
        }
        rep["notes"] = NOTES.get(name, [])
        rep["layout_checks"] = layout_checks(name, r, cfg)
        crosscheck(name, dst, rep)
        families[name] = rep
        print(f"{name}: {dst} {rep['bytes']} bytes, {len(tensors)} tensors, pre {rep['pre_tokenizer_override']}, "
              f"transformers: {rep['transformers_gguf_load'][:60]} "
              f"{rep.get('transformers_gguf_max_abs_logit_diff_vs_folder', '')}; with overrides "
              f"{rep.get('transformers_gguf_with_overrides_load', '-')[:60]} "
              f"{rep.get('transformers_gguf_with_overrides_max_abs_logit_diff_vs_folder', '')}", flush=True)
    text = json.dumps(dict(sorted(families.items())), indent=2, ensure_ascii=False) + "\n"
    out_path.write_text(text)


if __name__ == "__main__":
    main()
