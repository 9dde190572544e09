"""Client side of the control plane: what `splitserve generate --target` and
`splitserve admin` call. Imports no torch, so the CLI starts fast.

Failures surface as `RpcFailed` with the status code name and a one-line message
(`UNAVAILABLE: cannot connect to 10.0.0.5:50051 within 5s`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from splitserve.errors import SplitserveError
from splitserve.rpc import admin_pb2, admin_pb2_grpc, generation_pb2, generation_pb2_grpc

DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_CALL_TIMEOUT_S = 30.0
MAX_MESSAGE_BYTES = 8 << 20  # as the server: a large prompt reaches its validation


class RpcFailed(SplitserveError):
    """A call to a splitserve daemon failed; `code` is the gRPC status code name."""

    def __init__(self, target: str, code: str, details: str) -> None:
        details = " ".join((details or "").split()) or "(no details)"
        super().__init__(f"{code}: {details}")
        self.target = target
        self.code = code
        self.details = details


@dataclass(frozen=True)
class ClientSecurity:
    """How to reach a daemon with TLS and auth on (config/security.py): the CA that
    signed its certificate, our certificate and key for mTLS, a bearer token. Empty:
    plaintext, no token."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    token: str = ""

    @classmethod
    def from_files(cls, ca_file: str = "", cert_file: str = "", key_file: str = "",
                   token_file: str = "") -> ClientSecurity:
        """The token is the file's first line that is not blank or a comment."""
        token = ""
        if token_file:
            lines = [line.split("#", 1)[0].strip() for line in _read(token_file).splitlines()]
            token = next((line for line in lines if line), "")
            if not token:
                raise SplitserveError(f"{token_file}: no token in the file")
        return cls(ca_file, cert_file, key_file, token)

    @property
    def tls(self) -> bool:
        return bool(self.ca_file or self.cert_file)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read_bytes(self.ca_file) if self.ca_file else None,
            private_key=_read_bytes(self.key_file) if self.key_file else None,
            certificate_chain=_read_bytes(self.cert_file) if self.cert_file else None)


PLAINTEXT = ClientSecurity()


def _read_bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SplitserveError(f"{path}: cannot read: {exc.strerror}") from None


def _read(path: str) -> str:
    return _read_bytes(path).decode(errors="replace")


def open_channel(target: str, security: ClientSecurity = PLAINTEXT,
                 extra_options: Sequence[tuple[str, int]] = ()) -> grpc.aio.Channel:
    """A channel to `target` (host:port), TLS when `security` says, with the message
    size limits and `extra_options`; it connects on first use."""
    options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), *extra_options]
    return (grpc.aio.secure_channel(target, security.channel_credentials(), options)
            if security.tls else grpc.aio.insecure_channel(target, options))


@contextlib.asynccontextmanager
async def connect(target: str, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
                  security: ClientSecurity = PLAINTEXT) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to `target` (host:port), ready, or RpcFailed(UNAVAILABLE)."""
    channel = open_channel(target, security)
    try:
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout_s)
        except TimeoutError:
            hint = " (TLS handshake failed? check --tls-ca)" if security.tls else ""
            raise RpcFailed(target, "UNAVAILABLE",
                            f"cannot connect to {target} within {timeout_s:g}s{hint}") from None
        yield channel
    finally:
        await channel.close()


def generate_request(
    text: str | None = None,
    token_ids: Sequence[int] = (),
    *,
    chat: bool = False,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int = 0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    priority: str = "",
    request_id: str = "",
) -> generation_pb2.GenerateRequest:
    """A GenerateRequest; None leaves a field absent (the server's default applies)."""
    req = generation_pb2.GenerateRequest(
        token_ids=token_ids, chat=chat, top_k=top_k, stop=stop, stop_token_ids=stop_token_ids,
        ignore_eos=ignore_eos, priority=priority, request_id=request_id)
    if text is not None:
        req.text = text
    if max_tokens is not None:
        req.max_tokens = max_tokens
    if temperature is not None:
        req.temperature = temperature
    if top_p is not None:
        req.top_p = top_p
    if seed is not None:
        req.seed = seed
    return req


async def stream_generate(
    target: str,
    request: generation_pb2.GenerateRequest,
    *,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    timeout_s: float | None = None,
    security: ClientSecurity = PLAINTEXT,
) -> AsyncIterator[generation_pb2.GenerateChunk]:
    """Yield the chunks of one Generate call; leaving early cancels the request."""
    async with connect(target, connect_timeout_s, security) as channel:
        call = generation_pb2_grpc.GenerationStub(channel).Generate(
            request, timeout=timeout_s, metadata=security.metadata())
        try:
            async for chunk in call:
                yield chunk
        except grpc.aio.AioRpcError as exc:
            raise RpcFailed(target, exc.code().name, exc.details() or "") from None
        finally:
            call.cancel()  # no-op when the call already ended


@dataclass(frozen=True)
class CallOptions:
    """How one Admin call reaches its daemon."""

    security: ClientSecurity = PLAINTEXT
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    timeout_s: float = DEFAULT_CALL_TIMEOUT_S


DEFAULT_CALL = CallOptions()


async def _unary(target: str, method: str, request: Message, options: CallOptions) -> Any:
    async with connect(target, options.connect_timeout_s, options.security) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        try:
            return await getattr(stub, method)(request, timeout=options.timeout_s,
                                               metadata=options.security.metadata())
        except grpc.aio.AioRpcError as exc:
            raise RpcFailed(target, exc.code().name, exc.details() or "") from None


async def admin_status(target: str, options: CallOptions = DEFAULT_CALL
                       ) -> admin_pb2.GetStatusResponse:
    resp: admin_pb2.GetStatusResponse = await _unary(
        target, "GetStatus", admin_pb2.GetStatusRequest(), options)
    return resp


async def admin_workers(target: str, options: CallOptions = DEFAULT_CALL
                        ) -> admin_pb2.ListWorkersResponse:
    resp: admin_pb2.ListWorkersResponse = await _unary(
        target, "ListWorkers", admin_pb2.ListWorkersRequest(), options)
    return resp


async def admin_drain(target: str, grace_s: float, options: CallOptions = DEFAULT_CALL
                      ) -> admin_pb2.DrainResponse:
    """Drain; the call may take up to `grace_s`, so its deadline allows for that."""
    resp: admin_pb2.DrainResponse = await _unary(
        target, "Drain", admin_pb2.DrainRequest(grace_s=grace_s),
        replace(options, timeout_s=grace_s + options.timeout_s))
    return resp


async def admin_set_role(target: str, role: str, grace_s: float,
                         options: CallOptions = DEFAULT_CALL) -> admin_pb2.SetRoleResponse:
    """Switch a worker's role in place; drains first, so the deadline allows `grace_s`."""
    resp: admin_pb2.SetRoleResponse = await _unary(
        target, "SetRole", admin_pb2.SetRoleRequest(role=role, grace_s=grace_s),
        replace(options, timeout_s=grace_s + options.timeout_s))
    return resp


async def admin_resume(target: str, options: CallOptions = DEFAULT_CALL
                       ) -> admin_pb2.ResumeResponse:
    resp: admin_pb2.ResumeResponse = await _unary(
        target, "Resume", admin_pb2.ResumeRequest(), options)
    return resp


async def admin_reload(target: str, options: CallOptions = DEFAULT_CALL
                       ) -> admin_pb2.ReloadResponse:
    resp: admin_pb2.ReloadResponse = await _unary(
        target, "Reload", admin_pb2.ReloadRequest(), options)
    return resp


async def admin_config(target: str, options: CallOptions = DEFAULT_CALL
                       ) -> admin_pb2.GetConfigResponse:
    resp: admin_pb2.GetConfigResponse = await _unary(
        target, "GetConfig", admin_pb2.GetConfigRequest(), options)
    return resp


# --- rendering (CLI output) ----------------------------------------------------------
def to_json(message: Message) -> str:
    """Proto3 JSON with the .proto field names and zero values included."""
    return json_format.MessageToJson(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def state_name(state: int) -> str:
    return admin_pb2.ServingState.Name(state).removeprefix("SERVING_STATE_")


def status_rows(status: admin_pb2.GetStatusResponse) -> list[tuple[str, str]]:
    c = status.counters
    return [
        ("worker", f"{status.worker_id} ({status.role})"),
        ("state", state_name(status.state)),
        ("uptime", f"{status.uptime_s:.1f} s"),
        ("model", status.model_fingerprint or "-"),
        ("config hash", status.config_hash or "-"),
        ("config reload error", status.config_reload_error or "none"),
        ("routing policy", _policy_note(status)),
        ("KV pages", (f"{status.num_pages_used} used, {status.num_pages_free} free, "
                      f"{status.num_pages_quarantined} quarantined, "
                      f"{status.num_pages_total} total")),
        ("requests", (f"{status.num_in_flight} in flight, {status.num_running} running, "
                      f"{status.num_waiting} waiting")),
        ("prefills", (f"{c.num_local_prefills} local, {c.num_remote_prefills} remote, "
                      f"{c.num_fallbacks} fallbacks")),
        ("transfers", f"{c.num_transfers} ({c.num_transfer_failures} failed)"),
        ("finished", str(c.num_requests_finished)),
        ("rejected", str(c.num_rejects)),
    ]


def _policy_note(status: admin_pb2.GetStatusResponse) -> str:
    """Which routing a decode worker applies: a splitserve-policy revision over its file."""
    if status.role != "decode":
        return "-"
    note = (f"revision {status.policy_revision} over the config file" if status.policy_revision
            else "config file")
    return f"{note}; {status.policy_error}" if status.policy_error else note


def outcome_name(outcome: int) -> str:
    return admin_pb2.RoleSwitchOutcome.Name(outcome).removeprefix("ROLE_SWITCH_OUTCOME_")


def set_role_line(resp: admin_pb2.SetRoleResponse) -> str:
    line = (f"role {resp.role} (was {resp.previous_role}): {outcome_name(resp.outcome)}, "
            f"state {state_name(resp.state)}")
    return line + (f", {resp.num_in_flight} in flight" if resp.num_in_flight else "")


def reload_rows(result: admin_pb2.ReloadResponse) -> list[tuple[str, str]]:
    return [
        ("config hash", result.config_hash or "-"),
        ("applied", ", ".join(result.applied_fields) or "none"),
        ("needs a restart", ", ".join(result.restart_fields) or "none"),
        ("error", result.error or "none"),
    ]


def worker_rows(workers: admin_pb2.ListWorkersResponse) -> list[tuple[str, ...]]:
    header = ("WORKER", "ROLE", "ADDRESS", "PAGES", "PAGE SIZE", "DTYPE", "MODEL")
    return [header] + [(w.worker_id, w.role, w.grpc_address or "-", str(w.num_pages),
                        str(w.page_size), w.dtype, w.model_fingerprint)
                       for w in workers.workers]


def format_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip()
                     for r in rows)
