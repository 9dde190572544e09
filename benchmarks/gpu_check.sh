#!/usr/bin/env bash
# The GPU checks of the Triton kernels in one call (issue 14 item 5): the kernel tests
# compiled natively (no interpreter) against their plain-torch references, then
# `benchmarks/kernels.py --json` (bf16, full sweep). Run from the repository root on a
# machine with a CUDA GPU whose python3 has torch and triton (nothing else is needed:
# the kernels and their tests import no other third-party package):
#
#     bash benchmarks/gpu_check.sh OUTDIR
#
# Writes OUTDIR/kernel_tests.log, OUTDIR/kernels.json (+ .err) and prints a summary.
set -uo pipefail
out=${1:?usage: gpu_check.sh OUTDIR}
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
python3 - <<'EOF' | tee "$out/machine.txt"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
EOF
start=$(date +%s)
timeout 240 python3 -m pytest tests/kernels -q -p no:cacheprovider -o addopts= \
    >"$out/kernel_tests.log" 2>&1
echo "kernel tests: exit $? in $(( $(date +%s) - start )) s: $(tail -1 "$out/kernel_tests.log")"
start=$(date +%s)
timeout 240 python3 benchmarks/kernels.py --json >"$out/kernels.json" 2>"$out/kernels.err"
echo "kernels.py: exit $? in $(( $(date +%s) - start )) s"
python3 - "$out/kernels.json" <<'EOF'
import json, sys
try:
    result = json.load(open(sys.argv[1]))
except ValueError:
    sys.exit("no JSON from kernels.py")
print(result["machine"])
for c in result["decode"]:
    print(f"decode {c['model']:>20} page {c['page_size']:>2} ctx {c['context_len']:>5} "
          f"B {c['batch_size']:>3}: {c['kernel_gbps']:7.0f} GB/s "
          f"{c['fraction_of_copy']:.2f} of copy, {c['speedup_vs_sdpa']:.2f}x SDPA")
for c in result["pages"]:
    print(f"{c['op']:>6} {c['model']:>20} page {c['page_size']:>2} x{c['num_pages']:>4}: "
          f"{c['kernel_gbps']:7.0f} GB/s {c['fraction_of_copy']:.2f} of copy")
print("skipped:", len(result["skipped"]))
EOF
