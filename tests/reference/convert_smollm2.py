#!/usr/bin/env python3
"""Turn the SmolLM2-135M-Instruct GGUF into a Hugging Face model folder.

    python tests/reference/convert_smollm2.py --gguf FILE.gguf --out DIR [--dtype float32|bfloat16]

get-smollm2.sh fetches the GGUF (Q4_1, token embedding Q8_0, norms F32) and
runs this with the reference venv (tests/reference/setup-env.sh). The folder
is the real model that tests/real_model.rs and tests/gguf/tokenizer.rs
compare wgtune with; docs/reference-data.md says where it fits.

What it does, and why:
  * Weights: transformers' GGUF loader dequantizes every tensor and undoes
    llama.cpp's row permutation of q_proj/k_proj. A second, independent path
    (gguf.quants.dequantize plus the inverse permutation below) must agree
    exactly on a sample of tensors, or the script stops.
  * transformers 5 marks a GGUF-loaded model as quantized (a quantizer that
    cannot be saved or trained), so the weights are copied into a plain
    LlamaForCausalLM built from the same config, with tied embeddings.
  * Tokenizer: llama.cpp's pre-tokenizer type "smollm" splits every digit on
    its own before the GPT-2 regex, as SmolLM2's original tokenizer.json does.
    transformers does not know "smollm" and falls back to the plain GPT-2
    split, so the pre-tokenizer is replaced by Digits(individual) + ByteLevel.
  * config.json is written with the spellings older readers expect too
    (top-level rope_theta, torch_dtype, rms_norm_eps exactly 1e-5 instead of
    the float32 value GGUF stores); tokenizer_config.json carries the chat
    template and adds neither BOS nor EOS, like the original model.
  * CONVERSION.json records the source file, the dtype, the cross-check
    differences and the tokenizer patch.
"""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

# GGUF tensor -> (HF tensor, heads to un-permute by or None). A few of each kind:
# the Q8_0 embedding, permuted q/k, a plain Q4_1 matrix, the last layer, a norm.
CROSS_CHECKED = {
    "token_embd.weight": ("model.embed_tokens.weight", None),
    "blk.0.attn_q.weight": ("model.layers.0.self_attn.q_proj.weight", "num_attention_heads"),
    "blk.0.attn_k.weight": ("model.layers.0.self_attn.k_proj.weight", "num_key_value_heads"),
    "blk.0.attn_v.weight": ("model.layers.0.self_attn.v_proj.weight", None),
    "blk.29.ffn_down.weight": ("model.layers.29.mlp.down_proj.weight", None),
    "output_norm.weight": ("model.norm.weight", None),
}

DIGIT_SAMPLE = "In 2024, 12345 + 678 = 13023"


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf permute of a q/k weight [out, in].

    llama.cpp stores each head's rows as (2, half) interleaved into (half, 2);
    this reads them back as (half, 2) and swaps to (2, half)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def cross_check(gguf_path: Path, state: dict, cfg) -> dict:
    """Max |difference| between transformers' weights and gguf-py's own decode."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    tensors = {t.name: t for t in GGUFReader(str(gguf_path)).tensors}
    diffs = {}
    for gname, (hname, heads_key) in CROSS_CHECKED.items():
        t = tensors[gname]
        # GGUF lists dims innermost first; HF's [out, in] is the reverse.
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        if heads_key is not None:
            w = unpermute(w, getattr(cfg, heads_key))
        diff = float(np.abs(w - state[hname].float().numpy()).max())
        print(f"cross-check {gname:24s} {t.tensor_type.name:5s} {list(w.shape)} max|diff| {diff:.3g}")
        diffs[gname] = diff
    return diffs


def patch_digits(tok) -> None:
    """Give the tokenizer SmolLM2's own pre-tokenizer (see the module doc)."""
    backend = tok.backend_tokenizer
    before = tok.convert_ids_to_tokens(tok(DIGIT_SAMPLE)["input_ids"])
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    after = tok.convert_ids_to_tokens(tok(DIGIT_SAMPLE)["input_ids"])
    print("digits before the patch:", before)
    print("digits after the patch: ", after)
    # Splitting digits one by one is only right if the vocabulary has no multi-digit tokens.
    multi = [t for t in tok.get_vocab() if len(t.lstrip("Ġ")) > 1 and t.lstrip("Ġ").isdigit()]
    assert not multi, f"multi-digit tokens in the vocabulary: {multi[:10]}"


def plain_copy(model, gen: GenerationConfig) -> LlamaForCausalLM:
    """The GGUF-loaded weights in an ordinary, saveable LlamaForCausalLM."""
    fields = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        fields.pop(key, None)
    plain = LlamaForCausalLM(LlamaConfig(**fields))
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if plain.config.tie_word_embeddings:
        missing = [m for m in missing if m != "lm_head.weight"]
    assert not missing and not unexpected, (missing, unexpected)
    plain.tie_weights()
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
    plain.generation_config = gen
    return plain


def rewrite_json(path: Path, edit, **dump) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, **dump) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    gguf_path = args.gguf.resolve()
    src_dir, name = str(gguf_path.parent), gguf_path.name

    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32).eval()
    cfg = model.config

    patch_digits(tok)
    tok.pad_token = tok.pad_token or tok.eos_token
    assert tok.chat_template, "the GGUF carries no chat template"

    diffs = cross_check(gguf_path, model.state_dict(), cfg)
    assert max(diffs.values()) < 1e-6, f"the two dequantizations disagree: {diffs}"

    cfg.architectures = ["LlamaForCausalLM"]
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    gen = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    plain = plain_copy(model, gen)

    out = args.out
    if out.is_dir():
        shutil.rmtree(out)
    plain.to(getattr(torch, args.dtype)).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    gen.save_pretrained(out)

    def fix_config(c):
        c["rms_norm_eps"] = 1e-5  # GGUF keeps float32(1e-5) = 9.999999747378752e-06
        c["rope_theta"] = c.get("rope_parameters", {}).get("rope_theta", 100000.0)
        c["torch_dtype"] = c.get("dtype", args.dtype)
        c.pop("_model_name_or_path", None)

    def fix_tokenizer_config(t):
        t["chat_template"] = tok.chat_template  # transformers 5 puts it in chat_template.jinja only
        t.update(add_bos_token=False, add_eos_token=False, clean_up_tokenization_spaces=False)
        for key in ("is_local", "local_files_only"):
            t.pop(key, None)

    rewrite_json(out / "config.json", fix_config, indent=2, sort_keys=True)
    rewrite_json(out / "tokenizer_config.json", fix_tokenizer_config, indent=2)
    (out / "CONVERSION.json").write_text(json.dumps({
        "source": name,
        "source_quant": "Q4_1 (token_embd Q8_0, norms F32)",
        "dtype": args.dtype,
        "dequant_check_max_abs_diff": diffs,
        "tokenizer_patch": "pre_tokenizer = Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)]",
    }, indent=2) + "\n")
    print("wrote", out, sorted(p.name for p in out.iterdir()))


if __name__ == "__main__":
    main()
