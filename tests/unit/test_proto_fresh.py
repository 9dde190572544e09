"""The committed generated code in src/splitserve/rpc/ matches proto/ (run `make proto`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto" / "splitserve" / "v1"
RPC_DIR = ROOT / "src" / "splitserve" / "rpc"
HAND_WRITTEN = {"__init__.py"}


def test_generated_protos_are_fresh(tmp_path: Path) -> None:
    protos = sorted(str(p.relative_to(ROOT)) for p in PROTO_DIR.glob("*.proto"))
    assert protos, f"no .proto files under {PROTO_DIR}"
    # The same invocation as the Makefile's `proto` target, into a scratch directory.
    res = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-Isplitserve/rpc=proto/splitserve/v1",
         f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
         *protos],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    fresh_dir = tmp_path / "splitserve" / "rpc"
    fresh = {p.name: p.read_bytes() for p in fresh_dir.iterdir() if p.is_file()}
    committed = {p.name: p.read_bytes() for p in RPC_DIR.iterdir()
                 if p.is_file() and p.name not in HAND_WRITTEN}
    assert sorted(committed) == sorted(fresh), (
        "src/splitserve/rpc/ and proto/ list different modules; run `make proto` and remove "
        "files of deleted protos")
    stale = sorted(name for name in fresh if fresh[name] != committed[name])
    assert not stale, f"out of date (edit the .proto, then run `make proto`): {stale}"
