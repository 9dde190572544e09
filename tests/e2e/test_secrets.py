"""No secret leaks: a full run of a decode and a prefill daemon whose broker URL carries
a password, behind TLS and a tokens file, with remote prefills, refused calls, a
reload and Admin/GetConfig through the CLI. Afterwards no log line of either daemon,
no CLI output and no RPC reply contains the password or any token."""

from __future__ import annotations

import secrets
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import cluster
import pytest

from splitserve.certs import DEFAULT_GRANTS, init_certs, write_tokens
from splitserve.config.security import AuthConfig, TlsConfig
from splitserve.queue.broker import NatsServer, find_free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cluster.SPLITSERVE, *args], capture_output=True, text=True,
                          check=False, timeout=120)


def test_no_secret_in_any_log_line_or_reply(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    init_certs(certs)
    write_tokens(certs, DEFAULT_GRANTS)
    tokens = [(certs / f"{name}.token").read_text().strip() for name in DEFAULT_GRANTS]
    password = secrets.token_urlsafe(24)
    broker = NatsServer(find_free_port(), tmp_path / "nats", log_path=tmp_path / "nats.log",
                        extra_args=("--user", "splitserve", "--pass", password))
    broker.start()
    url = f"nats://splitserve:{password}@127.0.0.1:{broker.port}"
    tls = TlsConfig(str(certs / "server.pem"), str(certs / "server.key"))
    auth = AuthConfig(str(certs / "tokens"))
    daemons = [cluster.start_daemon(replace(cluster.worker_config(role, f"{role}-0", url),
                                            grpc_tls=tls, auth=auth), tmp_path)
               for role in ("decode", "prefill")]
    ca = str(certs / "ca.pem")
    outputs: list[str] = []
    try:
        cluster.wait_ready(daemons, ca_file=ca)
        decode = daemons[0]
        admin = ("--target", decode.address, "--tls-ca", ca,
                 "--token-file", str(certs / "admin.token"))
        # A remote prefill (64 tokens, above the file's threshold of 40) and a local one.
        for words in (60, 3):
            out = cli("generate", "--target", decode.address, "--tls-ca", ca, "--prompt",
                      " ".join(["lorem"] * words), "--max-tokens", "4", "--temperature", "0")
            assert out.returncode == 0, out.stderr
            outputs += [out.stdout, out.stderr]
        for command in (("status", "--json"), ("config",), ("workers",)):
            out = cli("admin", *command, *admin)
            assert out.returncode == 0, out.stderr
            outputs += [out.stdout, out.stderr]
        config = outputs[-4]
        assert "nats_url: nats://splitserve:***@127.0.0.1" in config
        assert f"tokens_file: {certs / 'tokens'}" in config
        status = outputs[-6]
        assert '"num_remote_prefills": "1"' in status and '"num_local_prefills": "1"' in status
        # refused calls: no token, a made-up token, a token of the wrong scope
        for extra in ((), ("--token-file", str(certs / "client.token"))):
            out = cli("admin", "drain", "--grace", "0", "--target", decode.address,
                      "--tls-ca", ca, *extra)
            assert out.returncode == 1 and "Error: " in out.stderr
            outputs += [out.stdout, out.stderr]
        for daemon in daemons:  # a reload logs what changed
            daemon.signal(signal.SIGHUP)
        time.sleep(1.0)
    finally:
        cluster.stop_daemons(daemons)
        broker.stop()
    texts = {d.log_path.name: d.log_path.read_text(errors="replace") for d in daemons}
    assert all("ready: role" in text for text in texts.values())
    texts["cli"] = "\n".join(outputs)
    leaks = {name: [s[:4] + "…" for s in (password, *tokens) if s in text]
             for name, text in texts.items()}
    assert leaks == {name: [] for name in texts}
