"""Compile every kernel for an NVIDIA target without a GPU (run as a script).

The interpreter executes kernels as Python and accepts code the Triton compiler
rejects (a constexpr reassigned in a loop, type changes of loop-carried values),
and it never runs the bf16 tensor-core path of prefill attention. Compiling each
kernel to a cubin for sm_90 with the launch configurations the wrappers use
catches those on a CPU-only machine. Prints one JSON object: kernel variant ->
shared memory bytes. Must run without TRITON_INTERPRET.
"""

from __future__ import annotations

import json
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_for_gpu.py must run without TRITON_INTERPRET=1")

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from splitserve.kernels.decode_attention import (
    _paged_decode_merge_kernel,
    _paged_decode_split_kernel,
)
from splitserve.kernels.page_copy import _copy_pages_kernel
from splitserve.kernels.page_dtype import _convert_pages_kernel
from splitserve.kernels.page_heads import _copy_rows_kernel
from splitserve.kernels.page_resize import _resize_pages_kernel
from splitserve.kernels.prefill_attention import _paged_prefill_kernel
from splitserve.kernels.store_kv import _store_kv_kernel

TARGET = GPUTarget("cuda", 90, 32)


def compile_variant(kernel, pointers: dict[str, str], constexprs: dict[str, object],
                    floats: tuple[str, ...] = ()) -> int:
    """Compile with the given pointer types and constexprs; other args are i32 scalars.

    A non-constexpr argument listed in `constexprs` is compiled as the launcher's
    specialization of that value (e.g. `num_seqs == 1`).
    """
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        else:
            signature[name] = "fp32" if name in floats else "i32"
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=TARGET)
    return compiled.metadata.shared


def attention_variants() -> dict[str, int]:
    out = {}
    for dtype, block_d, block_n in (("bf16", 128, 32), ("fp32", 64, 64)):
        for store_lse in (True, False):
            out[f"decode_split[{dtype},d{block_d},lse={store_lse}]"] = compile_variant(
                _paged_decode_split_kernel,
                {"Q_ptr": f"*{dtype}", "KV_ptr": f"*{dtype}", "BlockTables_ptr": "*i32",
                 "SeqLens_ptr": "*i32", "Out_ptr": "*fp32" if store_lse else f"*{dtype}",
                 "Lse_ptr": "*fp32"},
                {"GROUP_SIZE": 3, "BLOCK_G": 16, "BLOCK_N": block_n, "BLOCK_D": block_d,
                 "STORE_LSE": store_lse, "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"},
                floats=("qk_scale_log2",))
    out["decode_merge[bf16]"] = compile_variant(
        _paged_decode_merge_kernel,
        {"Partial_ptr": "*fp32", "Lse_ptr": "*fp32", "Out_ptr": "*bf16"},
        {"BLOCK_S": 64, "BLOCK_D": 128})
    for dtype, dot_in_fp32, extra in (("bf16", False, {}), ("fp32", True, {"num_seqs": 1}),
                                      ("bf16", True, {})):
        block_d = 128 if dtype == "bf16" else 64
        out[f"prefill[{dtype},fp32dot={dot_in_fp32},{extra}]"] = compile_variant(
            _paged_prefill_kernel,
            {"Q_ptr": f"*{dtype}", "KV_ptr": f"*{dtype}", "CuQueryLens_ptr": "*i32",
             "SeqLens_ptr": "*i32", "BlockTables_ptr": "*i32", "Out_ptr": f"*{dtype}"},
            {"GROUP_SIZE": 8, "BLOCK_M": 32 if block_d == 128 else 64, "BLOCK_N": 32,
             "BLOCK_D": block_d, "DOT_IN_FP32": dot_in_fp32,
             "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32", **extra},
            floats=("qk_scale_log2",))
    return out


def page_variants() -> dict[str, int]:
    out = {"store_kv[bf16]": compile_variant(
        _store_kv_kernel,
        {"K_ptr": "*bf16", "V_ptr": "*bf16", "KV_ptr": "*bf16", "SlotMapping_ptr": "*i64"},
        {"BLOCK_H": 8, "BLOCK_D": 128})}
    for has_src, has_dst in ((True, False), (False, True), (True, True)):
        out[f"copy_pages[src_ids={has_src},dst_ids={has_dst}]"] = compile_variant(
            _copy_pages_kernel,
            {"Src_ptr": "*i16", "Dst_ptr": "*i16", "SrcIds_ptr": "*i64", "DstIds_ptr": "*i64"},
            {"HAS_SRC_IDS": has_src, "HAS_DST_IDS": has_dst, "BLOCK_SIZE": 4096})
    out["resize_pages"] = compile_variant(
        _resize_pages_kernel,
        {"Src_ptr": "*i16", "Dst_ptr": "*i16", "SrcIds_ptr": "*i64", "DstIds_ptr": "*i64"},
        {"BLOCK_T": 16, "BLOCK_ROW": 256})
    out["copy_rows"] = compile_variant(
        _copy_rows_kernel, {"Src_ptr": "*i16", "Dst_ptr": "*i16"}, {"BLOCK_R": 8, "BLOCK_C": 512})
    # (src storage, dst storage, SRC_FORMAT, DST_FORMAT): 0 native, 1 bf16 bits, 2 fp8 bits.
    for src, dst, src_fmt, dst_fmt in (("bf16", "u8", 1, 2), ("u8", "i16", 2, 1),
                                       ("fp32", "fp16", 0, 0), ("bf16", "fp32", 1, 0)):
        out[f"convert_pages[{src}->{dst}]"] = compile_variant(
            _convert_pages_kernel,
            {"Src_ptr": f"*{src}", "Dst_ptr": f"*{dst}", "SrcIds_ptr": "*i64",
             "DstIds_ptr": "*i64", "SrcScales_ptr": "*fp32", "DstScales_ptr": "*fp32"},
            {"SRC_FORMAT": src_fmt, "DST_FORMAT": dst_fmt, "HAS_SRC_IDS": True,
             "HAS_DST_IDS": False, "BLOCK_SIZE": 2048})
    return out


if __name__ == "__main__":
    print(json.dumps({"target": f"sm_{TARGET.arch}", **attention_variants(), **page_variants()}))
