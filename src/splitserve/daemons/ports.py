"""Ports for a local cluster (`splitserve up`, benchmarks, tests) from one free block.

Worker i listens on `base_grpc_port + i`: ports picked one by one can hand out such a
port to another service of the same cluster (seen in CI: a worker's /metrics port was
the router's). `cluster_ports` takes every port from one block of consecutive free
ones instead.
"""

from __future__ import annotations

from splitserve.queue.broker import find_free_ports


def cluster_ports(num_workers: int, worker_metrics: bool = False) -> dict[str, int]:
    """ClusterConfig's port fields for `num_workers` workers; worker /metrics ports
    (base_metrics_port + i) only with `worker_metrics`, else 0 (none)."""
    num_metrics = num_workers if worker_metrics else 0
    base = find_free_ports(num_workers + num_metrics + 5)
    after = base + 1 + num_workers + num_metrics
    return {"nats_port": base, "base_grpc_port": base + 1,
            "base_metrics_port": base + 1 + num_workers if worker_metrics else 0,
            "router_http_port": after, "router_grpc_port": after + 1,
            "planner_grpc_port": after + 2, "planner_metrics_port": after + 3}
