"""`NatsCluster`: several `NatsServer`s as one JetStream cluster on this host.

Used by the integration tests and the chaos suite (a 3-node cluster losing a node) and
by `splitserve up` (`nats_cluster_size: 3`). In production the brokers are their own
systemd units and nothing here runs.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from splitserve.errors import ConfigError
from splitserve.queue.broker import ClusterRoute, NatsServer, find_free_port
from splitserve.queue.errors import BrokerStartError


@dataclass(frozen=True)
class NodePorts:
    """The ports of one cluster node: clients, routes from other nodes, monitoring."""

    client: int
    route: int
    monitor: int


def free_node_ports(num_nodes: int) -> list[NodePorts]:
    ports: list[int] = []
    while len(ports) < 3 * num_nodes:  # the OS may hand out a port twice
        if (port := find_free_port()) not in ports:
            ports.append(port)
    return [NodePorts(*ports[3 * i:3 * i + 3]) for i in range(num_nodes)]


def base_node_ports(base_port: int, num_nodes: int) -> list[NodePorts]:
    """Clients on base+i, routes on base+2000+i, monitoring on base+4000+i (from
    4222: the usual 4222 / 6222 / 8222)."""
    return [NodePorts(base_port + i, base_port + 2000 + i, base_port + 4000 + i)
            for i in range(num_nodes)]


class NatsCluster:
    """`len(ports)` NatsServers forming one JetStream cluster on this host.

    Node i is named `<name>-n<i>` and stores under `<store_dir>/n<i>`, so a
    restarted node (or a restarted `splitserve up`) rejoins as the same peer.
    `start()` returns once every node reports JetStream healthy (`/healthz`: a
    meta leader is known and the node is current): ~0.3 s for 3 fresh nodes.
    `kill(i)`, `stop_node(i)` and `start_node(i)` act on one node.
    """

    def __init__(self, ports: Sequence[NodePorts], store_dir: Path, *, name: str = "splitserve",
                 host: str = "127.0.0.1", binary: Path | None = None,
                 log_dir: Path | None = None, start_timeout_s: float = 30.0) -> None:
        if len(ports) < 3 or len(ports) % 2 == 0:
            raise ConfigError("nats_cluster_size", f"a JetStream cluster needs an odd number "
                              f">= 3 of nodes, got {len(ports)}")
        self.ports = tuple(ports)
        self.start_timeout_s = start_timeout_s
        self.nodes: list[NatsServer] = []
        for i, own in enumerate(self.ports):
            peers = tuple(f"nats-route://{host}:{p.route}" for p in self.ports if p != own)
            log_path = None if log_dir is None else log_dir / f"nats-n{i}.log"
            self.nodes.append(NatsServer(
                own.client, Path(store_dir) / f"n{i}", host=host, monitor_port=own.monitor,
                binary=binary, log_path=log_path, start_timeout_s=start_timeout_s,
                server_name=f"{name}-n{i}", route=ClusterRoute(name, own.route, peers)))

    @property
    def config_text(self) -> str:
        """More of every node's config file (TLS, authorization): as NatsServer's."""
        return self.nodes[0].config_text if self.nodes else ""

    @config_text.setter
    def config_text(self, text: str) -> None:
        for node in self.nodes:
            node.config_text = text

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """All client URLs, comma-separated (what `nats_url` holds)."""
        return ",".join(self.urls)

    def index_of(self, server_name: str) -> int:
        """The node with this server name (e.g. the leader in a stream's info)."""
        return [node.server_name for node in self.nodes].index(server_name)

    def start(self) -> None:
        try:
            for node in self.nodes:
                node.start()
            self._wait_healthy(self.nodes)
        except BrokerStartError:
            self.stop()
            raise

    def start_node(self, index: int) -> None:
        """(Re)start one node; returns once it is JetStream-healthy again."""
        self.nodes[index].start()
        self._wait_healthy([self.nodes[index]])

    def stop_node(self, index: int) -> None:
        self.nodes[index].stop()

    def kill(self, index: int) -> None:
        """SIGKILL one node, to simulate a crash."""
        self.nodes[index].kill()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def _wait_healthy(self, nodes: Sequence[NatsServer]) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        pending = list(nodes)
        while True:
            said = {node.server_name: _healthz(node) for node in pending}
            pending = [node for node in pending if not said[node.server_name][0]]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise pending[0]._error(f"JetStream not healthy within {self.start_timeout_s:.1f}"
                                        f"s: {said[pending[0].server_name][1]}")
            time.sleep(0.1)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _healthz(node: NatsServer) -> tuple[bool, str]:
    """(healthy, what the monitoring endpoint said) for one running node."""
    if not node.is_running:
        return False, "not running"
    url = f"http://{node.host}:{node.monitor_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=1.0) as reply:
            return reply.status == 200, reply.read(512).decode(errors="replace")
    except urllib.error.HTTPError as err:
        return False, err.read(512).decode(errors="replace")
    except OSError as err:
        return False, str(err)
