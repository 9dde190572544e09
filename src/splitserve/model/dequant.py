"""Dequantization of GGUF tensor data to float32 (numpy, vectorized per block).

Block formats (ggml): each block covers 32 weights.
- Q8_0: f16 scale `d`, 32 × int8 `q`;               w = d·q          (34 bytes)
- Q4_0: f16 scale `d`, 16 bytes of nibbles;          w = d·(q − 8)    (18 bytes)
- Q4_1: f16 scale `d`, f16 min `m`, 16 bytes nibbles; w = d·q + m      (20 bytes)
In the 4-bit formats the low nibbles hold weights 0..15 and the high nibbles 16..31.
"""

from __future__ import annotations

import numpy as np

from splitserve.errors import ModelLoadError

QK = 32  # weights per block in every format handled here


def dequantize(type_name: str, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Raw tensor `data` (as stored) → float32 array of `shape` (outermost first)."""
    if type_name == "F32":
        return np.asarray(data, dtype=np.float32).reshape(shape)
    if type_name == "F16":
        return np.asarray(data).view(np.float16).astype(np.float32).reshape(shape)
    if type_name == "BF16":
        raw = np.asarray(data).view(np.uint16).astype(np.uint32) << 16
        return raw.view(np.float32).reshape(shape)
    blocks = np.asarray(data, dtype=np.uint8).reshape(-1)
    if type_name == "Q8_0":
        out = _q8_0(blocks.reshape(-1, 34))
    elif type_name == "Q4_0":
        out = _q4_0(blocks.reshape(-1, 18))
    elif type_name == "Q4_1":
        out = _q4_1(blocks.reshape(-1, 20))
    else:
        raise ModelLoadError(f"GGUF tensor type {type_name} is not supported "
                             "(supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)")
    return out.reshape(shape)


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    low = packed & 0x0F
    high = packed >> 4
    return np.concatenate([low, high], axis=1).astype(np.float32)


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    d = _f16(blocks, 0)
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return d * q


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    d = _f16(blocks, 0)
    return d * (_nibbles(blocks[:, 2:]) - 8.0)


def _q4_1(blocks: np.ndarray) -> np.ndarray:
    d = _f16(blocks, 0)
    m = _f16(blocks, 2)
    return d * _nibbles(blocks[:, 4:]) + m
