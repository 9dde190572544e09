"""Bit-level float conversions used inside kernels.

Conversions to bf16 and fp8 e4m3 are done with integer arithmetic instead of
`.to()`: the Triton 3.9 interpreter truncates fp32 -> bf16 and its fp32 -> fp8
rounding drops the mantissa carry into the exponent (e.g. 31.6 -> 16 instead of
32), so the native casts would make CPU tests disagree with the GPU. These helpers
round to nearest even, bit-identical to torch on both. The cost is a handful of
integer ops per element in kernels that are bound by memory bandwidth.
"""

from __future__ import annotations

import triton
import triton.language as tl

E4M3_MAX = 448.0  # largest finite float8_e4m3fn


@triton.jit
def fp32_to_bf16_bits(x):
    """fp32 -> bf16 bit pattern (int16), round to nearest even, NaN kept quiet."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = tl.where(is_nan, (bits >> 16) | 0x40, rounded)
    return rounded.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def fp32_to_e4m3_bits(x):
    """fp32 -> float8_e4m3fn bit pattern (uint8), round to nearest even.

    `x` must already be finite and clamped to [-448, 448].
    """
    bits = x.to(tl.uint32, bitcast=True)
    sign = (bits >> 24) & 0x80
    magnitude_bits = bits & 0x7FFFFFFF
    magnitude = magnitude_bits.to(tl.float32, bitcast=True)
    # Normal range (>= 2^-6): round the fp32 mantissa to 3 bits; a carry correctly
    # bumps the exponent. Then rebias the exponent from 127 to 7.
    normal = (magnitude_bits + 0x7FFFF + ((magnitude_bits >> 20) & 1)) >> 20
    normal = normal - (120 << 3)
    # Subnormal range: the code is the magnitude in units of 2^-9, rounded half to even.
    # Code 8 (a round-up to 2^-6) is exactly the smallest normal, so no special case.
    units = magnitude * 512.0
    whole = tl.floor(units)
    frac = units - whole
    odd = (whole.to(tl.int32) & 1) == 1
    subnormal = whole + tl.where((frac > 0.5) | ((frac == 0.5) & odd), 1.0, 0.0)
    code = tl.where(magnitude >= 0.015625, normal, subnormal.to(tl.uint32))
    return (code | sign).to(tl.uint8)


@triton.jit
def e4m3_bits_to_fp32(code):
    """float8_e4m3fn bit pattern (uint8) -> fp32, exact; the NaN codes give NaN."""
    code = code.to(tl.uint32)
    sign_bits = (code & 0x80) << 24
    exponent = (code >> 3) & 0xF
    mantissa = code & 0x7
    normal = (sign_bits | ((exponent + 120) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)
    subnormal = mantissa.to(tl.float32) * 0.001953125  # 2^-9
    subnormal = tl.where(sign_bits != 0, -subnormal, subnormal)
    value = tl.where(exponent == 0, subnormal, normal)
    return tl.where((code & 0x7F) == 0x7F, float("nan"), value)
