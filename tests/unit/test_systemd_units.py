"""The systemd units in systemd/: hardening (`systemd-analyze security`), syntax, the stop
timeout against the drain bound, and the broker's config with its generated auth blocks.

systemd is not PID 1 here, so the units are checked offline, never started.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from splitserve.config.daemon import MAX_DRAIN_GRACE_S
from splitserve.queue.broker import find_nats_server

ROOT = Path(__file__).resolve().parents[2]
UNITS = sorted((ROOT / "systemd").glob("*.service"))
WORKER_UNITS = [u for u in UNITS if u.name.startswith(("splitserve-decode@", "splitserve-prefill@"))]
MAX_EXPOSURE = 3.0
STOP_MARGIN_S = 20.0  # the stop after the drain: gRPC, deregistration, engine, NIXL
SPLITSERVE = str(Path(sys.executable).parent / "splitserve")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or ""
needs_systemd_analyze = pytest.mark.skipif(not SYSTEMD_ANALYZE,
                                           reason="systemd-analyze is not installed")


def service_section(unit: Path) -> dict[str, list[str]]:
    """The [Service] settings of a unit file: key → every value given, in order."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, f"unsupported time span {value!r}"
    return float(match[1]) * (60 if match[2] == "min" else 1)


def test_the_units_are_there() -> None:
    assert [u.name for u in UNITS] == [
        "splitserve-decode@.service", "splitserve-nats.service", "splitserve-planner.service",
        "splitserve-prefill@.service", "splitserve-router.service"]


@needs_systemd_analyze
@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_exposure_is_at_most_3(unit: Path) -> None:
    out = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=yes", str(unit)],
                         capture_output=True, text=True, timeout=60, check=False)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", out.stdout)
    assert match, out.stdout + out.stderr
    exposure = float(match[1])
    print(f"{unit.name}: exposure {exposure}")
    assert exposure <= MAX_EXPOSURE, out.stdout


@needs_systemd_analyze
@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_systemd_knows_every_setting(unit: Path) -> None:
    out = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True,
                         text=True, timeout=60, check=False)
    # Only the binary is missing on a machine where nothing is installed in /opt.
    complaints = [line for line in (out.stdout + out.stderr).splitlines()
                  if line and "/opt/splitserve/.venv/bin/" not in line]
    assert complaints == []


@pytest.mark.parametrize("unit", WORKER_UNITS, ids=lambda u: u.name)
def test_workers_notify_and_have_a_watchdog(unit: Path) -> None:
    service = service_section(unit)
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert seconds(service["WatchdogSec"][0]) >= 10
    assert service["Restart"] == ["on-failure"]  # covers a watchdog timeout


@pytest.mark.parametrize("unit", WORKER_UNITS, ids=lambda u: u.name)
def test_stop_timeout_exceeds_the_longest_drain(unit: Path) -> None:
    stop_s = seconds(service_section(unit)["TimeoutStopSec"][0])
    assert stop_s >= MAX_DRAIN_GRACE_S + STOP_MARGIN_S


def test_decode_and_prefill_units_differ_only_in_the_role() -> None:
    decode, prefill = ((ROOT / "systemd" / f"splitserve-{r}@.service").read_text().splitlines()
                       for r in ("decode", "prefill"))
    assert len(decode) == len(prefill)

    def without_role(line: str) -> str:
        for word, neutral in (("decode", "ROLE"), ("prefill", "ROLE"), ("requests", "work"),
                              ("jobs", "work")):
            line = line.replace(word, neutral)
        return line

    differing = [(d, p) for d, p in zip(decode, prefill, strict=True) if d != p]
    assert len(differing) == 5  # header, cross-reference, Description, ExecStart, drain
    assert all(without_role(d) == without_role(p) for d, p in differing), differing


def splitserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SPLITSERVE, *args], capture_output=True, text=True, timeout=120,
                          check=False)


def test_broker_config_takes_the_generated_auth_blocks(tmp_path: Path) -> None:
    """configs/nats.conf with the `include` of what `splitserve certs nats-auth` writes is
    valid, and that file names one user per worker plus admin and planner (0600)."""
    binary = find_nats_server()
    if binary is None:
        pytest.skip("nats-server is not installed")
    certs = tmp_path / "certs"
    assert splitserve("certs", "init", str(certs)).returncode == 0
    made = splitserve("certs", "nats-auth", str(certs), "--decode", "decode-0", "--decode",
                      "decode-1", "--prefill", "prefill-0", "--router", "router", "--out", str(tmp_path / "nats-auth.conf"))
    assert made.returncode == 0, made.stderr
    auth = tmp_path / "nats-auth.conf"
    assert auth.stat().st_mode & 0o777 == 0o600
    text = auth.read_text()
    assert text.count('"password": "$2b$11$') == 6
    for name in ("decode-0", "decode-1", "prefill-0", "router", "admin", "planner"):
        password = (certs / f"{name}.nats-password").read_text().strip()
        assert f'"user": "{name}"' in text and password not in text  # bcrypt hashes
        assert f"password_file: {certs / f'{name}.nats-password'}" in made.stdout
        assert password not in made.stdout
    template = (ROOT / "configs" / "nats.conf").read_text()
    assert "# include ./nats-auth.conf" in template
    config = tmp_path / "nats.conf"
    config.write_text(template.replace("# include ./nats-auth.conf", "include ./nats-auth.conf"))
    out = subprocess.run([str(binary), "-c", str(config), "-t"], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    store = service_section(ROOT / "systemd" / "splitserve-nats.service")["StateDirectory"]
    assert f"store_dir: /var/lib/{store[0]}" in template


@pytest.mark.parametrize(("setup", "args", "message"), [
    (False, ["--decode", "decode-0"], "run `splitserve certs init"),
    (True, ["--decode", "w-0", "--prefill", "w-0"], "broker users must be unique"),
    (True, ["--decode", "admin"], "broker users must be unique"),
    (True, ["--decode", "bad id!"], "invalid worker id 'bad id!'"),
])
def test_nats_auth_refuses_what_it_cannot_serve(tmp_path: Path, setup: bool, args: list[str],
                                                message: str) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    if setup:
        assert splitserve("certs", "init", str(certs)).returncode == 0
    out = splitserve("certs", "nats-auth", str(certs), *args)
    assert out.returncode == 1 and message in out.stderr, out.stderr
    assert not list(certs.glob("*nats*"))  # nothing half-written
