"""`splitserve up` as `make run` starts it: TLS and tokens on by default, and every command
its banner prints works as printed (run through bash, as a user pastes it)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from splitserve.daemons.ports import cluster_ports

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

ROOT = Path(__file__).resolve().parents[2]


def cluster_file(tmp_path: Path) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    # one block of ports: worker i takes base + i, which a port picked apart could be
    # (seen once: decode-1's /metrics port was the router's)
    config.update(state_dir=str(tmp_path / "state"), **cluster_ports(3, worker_metrics=True))
    assert config["num_decode_workers"] + config["num_prefill_workers"] == 3
    config["worker"]["engine"]["kv_cache_memory_mb"] = 96
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def banner_commands(up: subprocess.Popen[str], timeout_s: float = 240.0) -> list[str]:
    assert up.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = up.stdout.readline()
        if not line:
            raise AssertionError(f"up exited ({up.poll()}):\n" + "".join(lines))
        lines.append(line)
        if line.startswith("Ctrl-C stops the cluster."):
            start = lines.index("Try:\n") + 1
            return [cmd.strip() for cmd in lines[start:-1] if cmd.strip()]
    raise AssertionError("no banner:\n" + "".join(lines))


def state_ca(tmp_path: Path) -> Path:
    return tmp_path / "state" / "certs" / "ca.pem"


def bash(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                          check=False, timeout=120)


def test_up_is_secure_by_default_and_its_banner_commands_work(tmp_path: Path) -> None:
    path = cluster_file(tmp_path)
    config = yaml.safe_load(path.read_text())
    up = subprocess.Popen([sys.executable, "-m", "splitserve.cli", "up", "--config",
                           str(path)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    try:
        commands = banner_commands(up)
        assert len(commands) == 11, commands
        (generate, status, listing, grpc_generate, grpc_status, policy, metrics, curl,
         openai_client, get_plan, set_mode) = commands
        assert "--tls-ca" in generate and "--token-file" in status
        assert "-plaintext" not in " ".join(commands)
        results = {cmd: bash(cmd) for cmd in commands}
        failed = {cmd: r.stderr for cmd, r in results.items() if r.returncode != 0}
        assert failed == {}
        assert "Paris" in results[generate].stdout
        assert "decode-0" in results[status].stdout
        assert "splitserve.v1.Admin" in results[listing].stdout.split()
        assert "Paris" in "".join(json.loads(chunk).get("text", "") for chunk in
                                  results[grpc_generate].stdout.replace("}\n{", "}\0{")
                                  .split("\0"))
        assert json.loads(results[grpc_status].stdout)["worker_id"] == "decode-0"
        assert "splitserve:time_to_first_token" in results[metrics].stdout
        assert "--nats-password-file" in policy and "revision" in results[policy].stdout
        # the router: HTTPS with an API key, through curl and the openai client
        answer = json.loads(results[curl].stdout)
        assert "Paris" in answer["choices"][0]["message"]["content"], answer
        assert "Paris" in results[openai_client].stdout
        # the planner: its plan with the thresholds in force and why; SetMode
        plan = json.loads(results[get_plan].stdout)
        assert plan["leader"] is True and plan["actuator"] == "role", plan
        assert int(plan["thresholds_in_force"]["prefill_length_threshold"]) > 0, plan
        assert {r["role"] for r in plan["roles"]} == {"prefill", "decode"}, plan
        assert plan["reasons"], plan
        assert json.loads(results[set_mode].stdout)["mode"] == "PLANNER_MODE_ADVISE"
        planner_metrics = bash(f"curl -s http://127.0.0.1:{config['planner_metrics_port']}"
                               "/metrics").stdout
        assert "splitserve:planner_leader 1.0" in planner_metrics
        assert 'splitserve:planner_mode{mode="advise"} 1.0' in planner_metrics
        assert "--cacert" in curl and "SSL_CERT_FILE" in openai_client
        assert bash(curl.replace("authorization", "x-nothing")).stdout.count(
            "invalid_api_key") == 1
        # a long prompt goes remote over the secured broker: every permission it needs
        long = bash(generate.replace("'What is the capital of France?'",
                                     "'" + "Tell me about Paris. " * 40 + "'"))
        assert long.returncode == 0, long.stderr
        counters = json.loads(bash(grpc_status).stdout)["counters"]
        assert int(counters.get("num_remote_prefills", 0)) == 1, counters
        assert int(counters.get("num_fallbacks", 0)) == 0, counters
        # the broker refuses a login without the admin's password
        anonymous = bash(policy.split(" --nats-user ")[0])
        assert anonymous.returncode == 1 and "no NATS broker reachable" in anonymous.stderr
        # the same GetStatus without the token header is refused
        unauthenticated = bash(grpc_status.split(" -H ")[0] + " " +
                               " ".join(grpc_status.split(")\" ")[1:]))
        assert unauthenticated.returncode != 0 and "Unauthenticated" in unauthenticated.stderr
        # both refusals are counted: decode-0's gRPC, the router's HTTP (the curl above)
        worker_metrics = bash(metrics.split(" | ")[0]).stdout
        assert [line.rsplit(" ", 1)[1] for line in worker_metrics.splitlines()
                if line.startswith("splitserve:auth_refusals_total{")
                and 'code="unauthenticated"' in line] == ["1.0"], worker_metrics
        router_metrics = bash(f"curl -s --cacert {state_ca(tmp_path)} https://127.0.0.1:"
                              f"{config['router_http_port']}/metrics").stdout
        assert 'splitserve:router_auth_refusals_total{code="unauthenticated"} 1.0' in \
            router_metrics, router_metrics
        state = tmp_path / "state"
        logs = {p.name: p.read_text() for p in state.glob("*.log") if p.name != "nats.log"}
        assert sorted(logs) == ["decode-0.log", "decode-1.log", "planner.log", "prefill-0.log",
                                "router.log"]
        assert not [n for n, t in logs.items() if "violation" in t.lower()]
        assert (state / "certs" / "ca.pem").exists()
        assert "grpc_tls" in (state / "decode-0.yaml").read_text()
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
    assert up.returncode == 0
