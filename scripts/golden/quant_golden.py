#!/usr/bin/env python3
"""Golden vectors for the KV cache's q8_0 and q4_0 dtypes (ggml's block formats), from numpy.

An implementation written from the formats' definition, independent of the C++ one
(include/instinfer/core/dtype.hpp): every step is a whole-array numpy operation in float32, as
ggml's reference C (quantize_row_q8_0_ref, quantize_row_q4_0_ref) computes it in float:

  q8_0: d = amax / 127; id = 1 / d (0 when d == 0); q = roundf(x * id) (half away from zero);
        block = f16(d) | 32 x int8 q.                                            34 bytes
  q4_0: m = the first value of largest magnitude (with its sign); d = m / -8; id as above;
        q = min(15, trunc(x * id + 8.5)), the product rounded to float before the add;
        block = f16(d) | 16 bytes, byte j = q[j] | q[j + 16] << 4.               18 bytes
  dequantized: q8_0 q * f16(d); q4_0 (q - 8) * f16(d) (exact in float32).

Where ggml's C is undefined (a scale below 2^-128 makes id infinite: x * id is +-inf, or NaN for
x == 0), the library's rule is used: the integer saturates (q8_0 to +-127, q4_0 to 0 or 15) and
NaN counts as the value 0 (q8_0: 0, q4_0: 8). Non-finite inputs are not part of the formats and
not written here (the library refuses them).

Cross-checked against gguf-py 0.19.0's numpy quantizers (gguf.quants.quantize): the same bytes
for every case but two, both on purpose: q4_0 blocks of -0.0 (gguf-py's scale comes from the
value at argmax, -0.0, giving d = +0; ggml's C keeps max = +0.0f, giving d = -0, as here) and the
f32 denormal blocks (the undefined case above).

Output: a text file of cases, one field per line, bytes as hex:
  case <name> <source dtype f32|f16|bf16> <target dtype q8_0|q4_0> <number of values>
  in <source values, little-endian bytes>
  out <expected blocks>
  deq <expected dequantized values, f32 little-endian bytes>   (f32 sources only)
Every case holds a multiple of 64 values (whole rows of head_dim 64).

Usage: python3 scripts/golden/quant_golden.py OUT.txt   (needs numpy; the build's test runs it
again into the build tree when numpy is present and checks the library against both files)
"""
import sys

import numpy as np

F32 = np.float32
QK = 32


def round_half_away(p):
    """roundf() of float32 values, exactly: float64 holds |p| + 0.5 without rounding."""
    p64 = p.astype(np.float64)
    return np.sign(p64) * np.floor(np.abs(p64) + 0.5)


def reciprocal(d):
    """1 / d in float32, 0 where d == 0; inf where it overflows (d below 2^-128)."""
    with np.errstate(divide="ignore", over="ignore"):
        return np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0)).astype(F32)


def quantize_q8_0(x):
    b = x.reshape(-1, QK).astype(F32)
    amax = np.max(np.abs(b), axis=1)
    d = (amax / F32(127)).astype(F32)
    idv = reciprocal(d)
    with np.errstate(invalid="ignore", over="ignore"):
        prod = (b * idv[:, None]).astype(F32)
    q = round_half_away(prod)
    q = np.where(np.isnan(q), 0.0, q)
    q = np.clip(q, -127, 127).astype(np.int8)
    d16 = d.astype(np.float16)
    out = np.zeros((b.shape[0], 34), dtype=np.uint8)
    out[:, 0:2] = d16.view(np.uint16).astype("<u2").view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.view(np.uint8)
    deq = (q.astype(F32) * d16.astype(F32)[:, None]).astype(F32)
    return out.tobytes(), deq.reshape(-1)


def quantize_q4_0(x):
    b = x.reshape(-1, QK).astype(F32)
    mag = np.abs(b)
    first = np.argmax(mag, axis=1)  # the first index of the largest magnitude
    amax = mag[np.arange(b.shape[0]), first]
    # ggml starts from max = 0.0f and only replaces it for a larger magnitude: an all-zero block
    # keeps +0 even when its first value is -0.
    m = np.where(amax > 0, b[np.arange(b.shape[0]), first], F32(0)).astype(F32)
    d = (m / F32(-8)).astype(F32)
    idv = reciprocal(d)
    with np.errstate(invalid="ignore", over="ignore"):
        prod = (b * idv[:, None]).astype(F32)
        t = (prod + F32(8.5)).astype(F32)  # a separate float32 add: no fused multiply-add
    q = np.where(np.isnan(t), 8, np.where(t < 0, 0, np.minimum(15, np.floor(np.where(np.isfinite(t), t, 99)))))
    q = q.astype(np.uint8)
    d16 = d.astype(np.float16)
    out = np.zeros((b.shape[0], 18), dtype=np.uint8)
    out[:, 0:2] = d16.view(np.uint16).astype("<u2").view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q[:, :16] | (q[:, 16:] << 4)
    deq = ((q.astype(F32) - F32(8)) * d16.astype(F32)[:, None]).astype(F32)
    return out.tobytes(), deq.reshape(-1)


def to_bf16(x):
    """float32 -> bfloat16 bits, round to nearest even (inputs here are finite)."""
    u = x.astype(F32).view(np.uint32).astype(np.uint64)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return r.astype(np.uint16)


def source(values, src):
    """The source bytes for `values` and the float32 values the library will see."""
    if src == "f32":
        v = values.astype(F32)
        return v.astype("<f4").tobytes(), v
    if src == "f16":
        assert np.all(np.abs(values) <= 65504), "f16 rows hold finite values only"
        h = values.astype(np.float16)
        return h.astype("<f2").tobytes(), h.astype(F32)
    bits = to_bf16(values)
    return bits.astype("<u2").tobytes(), (bits.astype(np.uint32) << 16).view(F32)


def cases(rng):
    """(name, float64 values): every case a multiple of 64 values."""
    out = []
    out.append(("normal", rng.standard_normal(64 * 4)))
    out.append(("uniform_wide", rng.uniform(-1000, 1000, 64 * 4)))
    out.append(("scaled_rows", np.concatenate([rng.standard_normal(64) * 10.0 ** e for e in range(-6, 4)])))  # f16 rows: below 65504
    out.append(("zeros", np.zeros(128)))
    neg0 = np.zeros(64)
    neg0[0] = -0.0
    neg0[32] = -0.0
    out.append(("negative_zero_first", np.copysign(neg0, -1.0)))
    # Exact halves after scaling. q8_0: amax 127/8 gives d = 1/8 exactly and id = 8, so
    # x = (k + 0.5) / 8 scales to k + 0.5; both signs.
    k = np.arange(-31, 31)[:62]
    ties8 = np.concatenate([[127 / 8], (k + 0.5) / 8, [-(127 / 8)]])
    out.append(("q8_ties", np.concatenate([ties8, -ties8])))
    # q4_0: m = -2 gives d = m / -8 = 0.25 and id = 4: x = (j - 8.5) / 4 scales to j - 8.5
    # (x * id + 8.5 = j, an integer: truncation's edge), x = j / 4 - 2 to j - 8 (... = j + 0.5).
    j = np.arange(1, 17)
    t4 = np.concatenate([[-2.0], (j - 8.5) / 4, np.arange(0, 15) / 4 - 2])
    t4b = np.concatenate([[2.0], (8.5 - j) / 4, 2 - np.arange(0, 15) / 4])
    assert t4.size == 32 and t4b.size == 32
    out.append(("q4_ties", np.concatenate([t4, t4b])))
    # Equal magnitudes of both signs: the first one sets q4_0's sign.
    pm = rng.uniform(-1, 1, 64)
    pm[3], pm[9] = 1.5, -1.5
    pm[32 + 1], pm[32 + 20] = -3.0, 3.0
    out.append(("equal_magnitudes", pm))
    # Extremes of f16 (f16 rows hold at most 65504) with small values beside them.
    ext = rng.uniform(-1, 1, 128)
    ext[0], ext[40], ext[64], ext[100] = 65504.0, -65504.0, -65500.0, 65472.0
    ext[70] = 1e-3
    out.append(("extremes", ext))
    out.append(("all_max", np.array([65504.0, -65504.0] * 32)))
    # Tiny values: f16 subnormals (scale rounds to 0 or a subnormal f16) and f32 denormals (the
    # scale's reciprocal overflows: the saturating rule above).
    out.append(("f16_subnormal", rng.uniform(-6e-5, 6e-5, 64)))
    out.append(("tiny_scale", np.concatenate([rng.uniform(-1e-6, 1e-6, 32), rng.uniform(-1e-9, 1e-9, 32)])))
    den = np.concatenate([rng.uniform(-1e-39, 1e-39, 32), rng.uniform(-1e-44, 1e-44, 32)])
    den[5] = 0.0
    den[40] = 0.0
    out.append(("f32_denormal", den))
    # Values that round near the half-way points of float32 products (random, many blocks).
    out.append(("dense_random", rng.standard_normal(64 * 8) * rng.uniform(0.01, 100, 64 * 8)))
    return out


SMALL_SOURCE_CASES = ("normal", "zeros", "q8_ties", "q4_ties", "equal_magnitudes", "extremes", "all_max",
                      "f16_subnormal")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    rng = np.random.default_rng(20240615)
    lines = ["# generated by scripts/golden/quant_golden.py; do not edit"]
    for name, values in cases(rng):
        assert values.size % 64 == 0, name
        for src in ("f32", "f16", "bf16"):
            if src != "f32" and name not in SMALL_SOURCE_CASES:
                continue  # f16 / bf16 rows: the cases their values reach (the file stays small)
            raw, seen = source(values, src)
            for target, quantize in (("q8_0", quantize_q8_0), ("q4_0", quantize_q4_0)):
                blocks, deq = quantize(seen)
                lines.append(f"case {name} {src} {target} {values.size}")
                lines.append("in " + raw.hex())
                lines.append("out " + blocks.hex())
                if src == "f32":  # dequantizing depends on the blocks only
                    lines.append("deq " + deq.astype("<f4").tobytes().hex())
    with open(sys.argv[1], "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
