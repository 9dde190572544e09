"""The router of `splitserve up`: its config, process, readiness and banner lines.

With `router: true` (the default) `up` starts `splitserve router` after the workers
are ready, configured by `router_settings:` (config/router.py; e.g. `balance`), on
`router_http_port` (OpenAI API) and `router_grpc_port` (Generation),
and waits until it sees every decode worker serving. With `secure`, the router serves
HTTPS and gRPC with the cluster's server certificate, requires an API key (a token
with scope `generate`: `<state>/certs/client.token`), reaches the workers over TLS
and logs in to the broker as the user `router`.
"""

from __future__ import annotations

import json
import shlex
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

from splitserve.config.daemon import ClusterConfig
from splitserve.config.router import RouterConfig, WorkerClientConfig
from splitserve.config.schema import NatsConfig
from splitserve.config.security import AuthConfig, NatsAuthConfig, TlsConfig
from splitserve.daemons.children import start_daemon, stop_daemon, wait_until
from splitserve.model.loader import default_model_path

ROUTER_USER = "router"


def router_config(cluster: ClusterConfig, nats_url: str, certs_dir: Path | None,
                  nats_auth: NatsAuthConfig) -> RouterConfig:
    template = cluster.router_settings
    config = replace(
        template, http_address=f"127.0.0.1:{cluster.router_http_port}",
        grpc_address=f"127.0.0.1:{cluster.router_grpc_port}", nats_url=nats_url,
        nats_auth=nats_auth, nats=NatsConfig(replicas=cluster.nats_cluster_size),
        model=template.model or cluster.worker.engine.model or "")
    if certs_dir is None:
        return config
    return replace(
        config, workers=WorkerClientConfig(ca_file=str(certs_dir / "ca.pem"),
                                           token_file=str(certs_dir / "client.token")),
        grpc_tls=TlsConfig(str(certs_dir / "server.pem"), str(certs_dir / "server.key")),
        auth=AuthConfig(str(certs_dir / "tokens"), require_generate=True))


@dataclass
class RouterProcess:
    config: RouterConfig
    config_path: Path
    log_path: Path
    certs_dir: Path | None
    process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        scheme = "https" if self.config.grpc_tls.enabled else "http"
        return f"{scheme}://{self.config.http_address}/v1"

    def start(self) -> None:
        self.process = start_daemon("router", self.config_path, self.log_path)

    def health(self) -> dict[str, object]:
        """GET /health (any status), {} while it does not answer."""
        context = (ssl.create_default_context(cafile=str(self.certs_dir / "ca.pem"))
                   if self.certs_dir is not None else None)
        url = self.base_url.removesuffix("/v1") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as reply:
                return dict(json.loads(reply.read()))
        except urllib.error.HTTPError as exc:
            return dict(json.loads(exc.read()))
        except (OSError, ValueError):
            return {}

    def wait_ready(self, num_workers: int, timeout_s: float) -> None:
        wait_until("router", self.process,
                   lambda: self.health().get("num_workers_serving") == num_workers,
                   timeout_s, self.log_path, f"serving {num_workers} decode workers")

    def banner_lines(self) -> list[str]:
        """A curl and an openai client call against the router, as they work here."""
        model = self.config.model_name() or default_model_path().stem
        question = "What is the capital of France?"
        body = json.dumps({"model": model, "max_tokens": 16, "temperature": 0,
                           "messages": [{"role": "user", "content": question}]})
        curl = f"curl -s {self.base_url}/chat/completions -H 'content-type: application/json'"
        env = "OPENAI_API_KEY=none"
        if self.certs_dir is not None:
            ca, key = self.certs_dir / "ca.pem", self.certs_dir / "client.token"
            curl += f' --cacert {ca} -H "authorization: Bearer $(cat {key})"'
            env = f"SSL_CERT_FILE={ca} OPENAI_API_KEY=$(cat {key})"
        script = (f"import openai; c = openai.OpenAI(base_url='{self.base_url}'); "
                  f"print(c.chat.completions.create(model='{model}', max_tokens=16, "
                  f"temperature=0, messages=[{{'role': 'user', 'content': '{question}'}}])"
                  ".choices[0].message.content)")
        return [f"  {curl} -d {shlex.quote(body)}",
                f"  {env} {sys.executable} -c \"{script}\""]

    def stop(self, timeout_s: float) -> None:
        stop_daemon(self.process, timeout_s)
