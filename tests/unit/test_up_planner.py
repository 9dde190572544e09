"""What `splitserve up` gives its planner (daemons/up_planner.py): the address, broker,
security and the workers' routing; with the `local` actuator, the worker template and
a broker user per worker it may start."""

from __future__ import annotations

from pathlib import Path

from splitserve.config.daemon import ClusterConfig, WorkerConfig
from splitserve.config.planner import ActuatorConfig, PlannerConfig
from splitserve.config.security import NatsAuthConfig
from splitserve.daemons.up_planner import local_template, local_users, planner_config
from splitserve.routing.offload import RoutingConfig


def cluster(kind: str, planner: bool = True) -> ClusterConfig:
    return ClusterConfig(
        planner=planner, planner_grpc_port=50123,
        worker=WorkerConfig(routing=RoutingConfig(prefill_length_threshold=99)),
        planner_settings=PlannerConfig(actuator=ActuatorConfig(kind=kind,  # type: ignore[arg-type]
                                                                local_max_workers=3)))


def test_the_planner_gets_the_clusters_broker_security_and_routing(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    config = planner_config(cluster("role"), "nats://127.0.0.1:1", certs,
                            NatsAuthConfig("planner", str(certs / "planner.nats-password")))
    assert config.grpc_address == "127.0.0.1:50123"
    assert config.metrics_address == "127.0.0.1:9470"  # ClusterConfig.planner_metrics_port
    assert config.routing.prefill_length_threshold == 99
    assert config.nats_auth.user == "planner"
    assert config.auth.tokens_file == str(certs / "tokens")
    assert config.actuator.token_file == str(certs / "admin.token")
    assert local_users(cluster("role")) == []


def test_a_local_planner_gets_a_template_and_broker_users(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    assert local_users(cluster("local")) == [("local-0", "worker"), ("local-1", "worker"),
                                             ("local-2", "worker")]
    assert local_users(cluster("local", planner=False)) == []
    template = local_template(WorkerConfig(worker_id="decode-0", cpu_affinity=(0,),
                                           grpc_address="127.0.0.1:50051"), certs, "ca.pem")
    assert (template.worker_id, template.grpc_address, template.cpu_affinity) == (
        "", "127.0.0.1:0", ())
    assert template.nats_auth == NatsAuthConfig(
        "{worker_id}", str(certs / "{worker_id}.nats-password"), "ca.pem")
    path = tmp_path / "local-worker.yaml"
    config = planner_config(cluster("local"), "nats://127.0.0.1:1", None, NatsAuthConfig(),
                            path)
    assert config.actuator.local_worker_config == str(path)
    assert config.actuator.local_state_dir == str(tmp_path)
