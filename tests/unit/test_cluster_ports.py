"""A local cluster's ports come from one free block: no service's port is a worker's
base + i, and none is taken."""

from __future__ import annotations

import socket

from splitserve.daemons.ports import cluster_ports


def test_every_port_of_a_cluster_is_distinct_and_free() -> None:
    for num_workers in (1, 3, 8):
        ports = cluster_ports(num_workers)
        workers = [ports["base_grpc_port"] + i for i in range(num_workers)]
        services = [v for k, v in ports.items() if k not in ("base_grpc_port",
                                                             "base_metrics_port")]
        every = workers + services
        assert len(set(every)) == len(every) == num_workers + 5
        assert ports["base_metrics_port"] == 0
        for port in every:
            _assert_free(port)


def test_worker_metrics_ports_come_from_the_same_block() -> None:
    ports = cluster_ports(3, worker_metrics=True)
    workers = [ports[base] + i for base in ("base_grpc_port", "base_metrics_port")
               for i in range(3)]
    services = [v for k, v in ports.items() if not k.startswith("base_")]
    every = workers + services
    assert len(set(every)) == len(every) == 3 + 3 + 5
    assert max(every) - min(every) == len(every) - 1  # one block
    for port in every:
        _assert_free(port)


def _assert_free(port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # free: binds
