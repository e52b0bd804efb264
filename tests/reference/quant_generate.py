#!/usr/bin/env python3
"""Per-format dequantization reference values for wgtune, produced by gguf-py (the referee).

Run from anywhere (the script changes to the repository root):

    ~/.cache/wgtune-ref/venv/bin/python tests/reference/quant_generate.py

It rewrites tests/reference/data/quant/ deterministically (numpy, fixed seed; two runs are
byte-identical). Measured with gguf 0.19.0, numpy 2.4.6, safetensors 0.8.0; other versions are
refused unless WGTUNE_REF_ANY_VERSION=1.

Outputs, one file per ggml type wgtune reads (see the "Per-format dequantization" section of
tests/reference/README.md):
  data/quant/<type>.safetensors   <type> in f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q4_k q5_k q6_k
      raw        U8  [rows, row_bytes]  the tensor bytes exactly as a GGUF file stores them, row-major
      expected   F32 [rows, cols]       gguf.quants.dequantize(raw, type)
      metadata   ggml_type (ggml's name, e.g. "Q4_K"), ggml_type_id, rows, cols, block_elems,
                 block_bytes, note (how the bytes were made)

Every shape is odd on purpose: rows are 5 or 7 (not a multiple of 8, so a GPU kernel's row tiles
have a ragged edge), columns are 37 for the float types and an odd number of blocks for the
quantized ones (3 blocks of 32 = 96; 1 or 3 super-blocks of 256 for the K types).

The bytes are random but valid: random quant/scale bytes everywhere except the f16 fields, which are
drawn as |x| log-uniform in [1e-3, 0.1] with a random sign (d of every type, dmin of Q4_K/Q5_K, m of
Q4_1/Q5_1), so no f16 field is inf or NaN. A few fields are then set to edge values (listed in each
file's `note`): an f16 subnormal d, d = -0.0, and for the min-carrying types a subnormal min. The
reference values are what gguf.quants.dequantize computes from the bytes, not what we meant.
"""

import importlib.metadata
import json
import os
import sys
from pathlib import Path

import numpy as np
import gguf
import safetensors
from gguf import GGMLQuantizationType as QT
from safetensors.numpy import load_file

VERSIONS = {"gguf": "0.19.0", "numpy": "2.4.6", "safetensors": "0.8.0"}

ROOT = Path(__file__).resolve().parents[2]
OUT_REL = Path("tests/reference/data/quant")
SEED = 20261206

# type -> (rows, cols). Append-only order: the seed of each type is SEED + its index.
CASES = [
    (QT.F32, 7, 37),
    (QT.F16, 7, 37),
    (QT.BF16, 7, 37),
    (QT.Q8_0, 7, 96),
    (QT.Q4_0, 5, 96),
    (QT.Q4_1, 7, 96),
    (QT.Q5_0, 5, 96),
    (QT.Q5_1, 7, 96),
    (QT.Q4_K, 5, 768),
    (QT.Q5_K, 7, 256),
    (QT.Q6_K, 5, 768),
]

# Byte offsets of the f16 fields in one block: (d, min or None).
F16_FIELDS = {
    QT.Q8_0: (0, None),
    QT.Q4_0: (0, None),
    QT.Q4_1: (0, 2),
    QT.Q5_0: (0, None),
    QT.Q5_1: (0, 2),
    QT.Q4_K: (0, 2),
    QT.Q5_K: (0, 2),
    QT.Q6_K: (208, None),
}


def check_versions():
    got = {
        "gguf": importlib.metadata.version("gguf"),
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
    }
    if got != VERSIONS and os.environ.get("WGTUNE_REF_ANY_VERSION") != "1":
        sys.exit(f"version mismatch: want {VERSIONS}, have {got} (set WGTUNE_REF_ANY_VERSION=1 to override)")


def f16_field(values):
    """f16 little-endian bytes, [n, 2] uint8."""
    return np.asarray(values, dtype=np.float16).reshape(-1, 1).view(np.uint8)


def sane_f16(rng, n):
    """n values with |x| log-uniform in [1e-3, 0.1] and a random sign."""
    mag = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), size=n))
    sign = np.where(rng.integers(0, 2, size=n) == 1, -1.0, 1.0)
    return (mag * sign).astype(np.float32)


def float_bytes(rng, qt, rows, cols):
    x = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    # Edge values in row 0; each is exactly representable in the stored type.
    if qt == QT.F32:
        x[0, :6] = [-0.0, 1e-42, -3e-39, 3.0e38, -1.5e30, 1.0]
        note = "N(0, 0.05^2) f32; row 0 cols 0-5: -0.0, subnormals 1e-42 and -3e-39, 3e38, -1.5e30, 1"
        raw = x.view(np.uint8)
    elif qt == QT.F16:
        x[0, :6] = [-0.0, 6e-8, -3.0e-5, 65504.0, -2.0e4, 1.0]
        note = "N(0, 0.05^2) as f16; row 0 cols 0-5: -0.0, subnormals 6e-8 and -3e-5, 65504, -2e4, 1"
        raw = x.astype(np.float16).view(np.uint8)
    else:
        x[0, :6] = [-0.0, 1e-40, -3e-39, 3.0e38, -1.5e30, 1.0]
        note = ("gguf.quants.quantize(BF16) (round to nearest even) of N(0, 0.05^2); row 0 cols 0-5: -0.0, "
                "subnormals 1e-40 and -3e-39, 3e38, -1.5e30, 1")
        raw = np.asarray(gguf.quants.quantize(x, QT.BF16)).view(np.uint8)
    return raw.reshape(rows, -1), note


def block_bytes(rng, qt, rows, cols):
    per, size = gguf.GGML_QUANT_SIZES[qt]
    nb = cols // per
    blocks = rng.integers(0, 256, size=(rows, nb, size), dtype=np.uint8)
    d_off, m_off = F16_FIELDS[qt]
    blocks[:, :, d_off:d_off + 2] = f16_field(sane_f16(rng, rows * nb)).reshape(rows, nb, 2)
    if m_off is not None:
        blocks[:, :, m_off:m_off + 2] = f16_field(sane_f16(rng, rows * nb)).reshape(rows, nb, 2)
    # Edge values: the last block of row 1 gets an f16 subnormal d, block 0 of row 3 d = -0.0,
    # and (with a min) the last block of row 2 a negative subnormal min.
    blocks[1, nb - 1, d_off:d_off + 2] = f16_field([3.0e-6])[0]
    blocks[3, 0, d_off:d_off + 2] = f16_field([-0.0])[0]
    note = (f"random block bytes; f16 fields |x| log-uniform in [1e-3, 0.1], random sign; "
            f"row 1 block {nb - 1} d = 3e-6 (f16 subnormal), row 3 block 0 d = -0.0")
    if m_off is not None:
        blocks[2, nb - 1, m_off:m_off + 2] = f16_field([-2.0e-6])[0]
        note += f", row 2 block {nb - 1} {'dmin' if per == 256 else 'm'} = -2e-6 (f16 subnormal)"
    return blocks.reshape(rows, nb * size), note


def save_st(path, tensors, metadata):
    """A safetensors file with a sorted header: safetensors' own writer keeps `__metadata__` in a hash
    map, so with more than one key its order (and the file's bytes) changes from run to run."""
    header, blobs, off = {"__metadata__": dict(sorted(metadata.items()))}, [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        dt = {np.dtype(np.uint8): "U8", np.dtype(np.float32): "F32"}[a.dtype]
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        blobs.append(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
        off += a.nbytes
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + b"".join(blobs))


def main():
    check_versions()
    os.chdir(ROOT)
    OUT_REL.mkdir(parents=True, exist_ok=True)
    for i, (qt, rows, cols) in enumerate(CASES):
        rng = np.random.default_rng(SEED + i)
        if qt in (QT.F32, QT.F16, QT.BF16):
            raw, note = float_bytes(rng, qt, rows, cols)
            per, size = 1, {QT.F32: 4, QT.F16: 2, QT.BF16: 2}[qt]
        else:
            raw, note = block_bytes(rng, qt, rows, cols)
            per, size = gguf.GGML_QUANT_SIZES[qt]
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        assert raw.shape == (rows, cols // per * size), (qt.name, raw.shape)
        expected = np.asarray(gguf.quants.dequantize(raw.copy(), qt), dtype=np.float32).reshape(rows, cols)
        assert np.isfinite(expected).all(), qt.name
        # The f16 fields are finite, so a NaN/inf can only come from the float types' own bits.
        meta = {
            "format": "np",
            "ggml_type": qt.name,
            "ggml_type_id": str(int(qt)),
            "rows": str(rows),
            "cols": str(cols),
            "block_elems": str(per),
            "block_bytes": str(size),
            "note": note,
            "source": "gguf.quants.dequantize(raw, type), gguf " + VERSIONS["gguf"],
        }
        path = OUT_REL / f"{qt.name.lower()}.safetensors"
        save_st(path, {"raw": raw, "expected": expected}, meta)
        back = load_file(str(path))
        assert np.array_equal(back["raw"], raw) and np.array_equal(back["expected"].view(np.uint32),
                                                                     expected.view(np.uint32))
        print(f"{path}: {qt.name} [{rows}, {cols}], {raw.nbytes} raw bytes, "
              f"|expected| max {np.abs(expected).max():.4g}, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
