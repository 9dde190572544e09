"""`splitserve certs init DIR`: a private CA and the certificates a cluster needs, and
the tokens file of its gRPC servers.

Made with `cryptography` (the Python Cryptographic Authority's library, OpenSSL
underneath); nothing here implements a primitive. What lands in DIR:
- `ca.pem` / `ca.key`: the CA (ECDSA P-256, 10 years), the trust root every client
  and server is given (`grpc_tls.client_ca_file`, `--tls-ca`, `grpcurl -cacert`);
- `server.pem` / `server.key`: the daemons' certificate (serverAuth and clientAuth),
  valid for `localhost`, 127.0.0.1, ::1, this host's name and every `--host` given;
- `<identity>.pem` / `<identity>.key` for each client identity (decode, prefill,
  planner, admin by default): clientAuth certificates whose common name is the
  identity, for mTLS (gRPC) and, later, the broker's per-role permissions.
Keys are written 0600, and an existing file is never overwritten (`init` again on
the same DIR keeps what is there and adds what is missing, so rotating means a new
DIR). `write_tokens` makes a tokens file (control/auth.py's format) with fresh
random tokens, and one file per token for the CLI's `--token-file`.
`broker_auth` makes a password file per broker user and renders the broker's `tls`
and `authorization` blocks (`splitserve certs nats-auth`, `splitserve up`), optionally
with bcrypt hashes (the `bcrypt` package: pyca's binding, the library everyone uses).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import bcrypt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from splitserve.errors import SplitserveError
from splitserve.queue.permissions import Identity, Role, server_config
from splitserve.queue.subjects import validate_worker_id

CLIENT_IDENTITIES = ("decode", "prefill", "planner", "admin")
CA_DAYS = 3650
LEAF_DAYS = 825  # the longest leaf lifetime browsers and most TLS stacks accept
BCRYPT_ROUNDS = 11  # nats-server's own default cost (`nats server passwd`)
TOKEN_BYTES = 32  # 256 bits, URL-safe base64: 43 characters
# The tokens `certs init` and `splitserve up` write: name → scopes (control/auth.py).
DEFAULT_GRANTS = {
    "admin": "admin:read,admin:write,generate",
    "monitor": "admin:read",
    "client": "generate",
}


class CertsError(SplitserveError):
    """A certificate directory cannot be created or read."""


@dataclass(frozen=True)
class Issued:
    """What `init_certs` left in the directory (paths), and what it created."""

    directory: Path
    created: tuple[str, ...]

    def path(self, name: str) -> Path:
        return self.directory / name


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "splitserve"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def write_private(path: Path, data: bytes, replace: bool = False) -> None:
    """`data` into a new file readable by its owner only (0600 from the start); an
    existing file is an error unless `replace`, which swaps it in atomically."""
    if replace:
        staged = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        write_private(staged, data)
        os.replace(staged, path)
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def _key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    except (OSError, ValueError) as exc:
        raise CertsError(f"{directory}: cannot load the CA: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertsError(f"{directory}/ca.key: not an EC key")
    return cert, key


def _new_ca(directory: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = _name("splitserve CA")
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA256()))
    write_private(directory / "ca.key", _key_bytes(key))
    (directory / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _leaf(directory: Path, stem: str, common_name: str, usages: Sequence[x509.ObjectIdentifier],
          sans: Sequence[x509.GeneralName]) -> None:
    ca_cert, ca_key = _load_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(common_name))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    write_private(directory / f"{stem}.key", _key_bytes(key))
    (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _server_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(["localhost", "127.0.0.1", "::1", socket.gethostname(), *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def init_certs(directory: str | Path, hosts: Sequence[str] = (),
               identities: Sequence[str] = CLIENT_IDENTITIES) -> Issued:
    """Create what is missing in `directory` (see the module docstring)."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    created: list[str] = []
    if not (path / "ca.pem").exists():
        if (path / "ca.key").exists():
            raise CertsError(f"{path}: ca.key without ca.pem; remove it or use a new directory")
        _new_ca(path)
        created.append("ca")
    server_usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    if not (path / "server.pem").exists():
        _leaf(path, "server", "splitserve server", server_usages, _server_names(hosts))
        created.append("server")
    for identity in identities:
        if not (path / f"{identity}.pem").exists():
            _leaf(path, identity, identity, [ExtendedKeyUsageOID.CLIENT_AUTH], [])
            created.append(identity)
    return Issued(path, tuple(created))


def write_tokens(directory: str | Path, grants: dict[str, str]) -> Path:
    """`directory/tokens` (NAME SCOPES TOKEN lines) with a fresh token per name in
    `grants` (name → comma-separated scopes), and `directory/<name>.token` holding each
    token alone (for `--token-file` and `grpcurl -H`). Existing files are kept."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    tokens_file = path / "tokens"
    if tokens_file.exists():
        return tokens_file
    lines = ["# NAME SCOPES TOKEN (see README, \"Trust\"); generated by splitserve"]
    for name, scopes in grants.items():
        token = secrets.token_urlsafe(TOKEN_BYTES)
        lines.append(f"{name} {scopes} {token}")
        write_private(path / f"{name}.token", f"{token}\n".encode())
    write_private(tokens_file, ("\n".join(lines) + "\n").encode())
    return tokens_file


def password_file(directory: str | Path, name: str) -> Path:
    """`directory/<name>.nats-password` with a fresh random password (0600) unless it
    exists: a broker user's password, as `nats_auth.password_file` names it."""
    path = Path(directory) / f"{name}.nats-password"
    if not path.exists():
        write_private(path, f"{secrets.token_urlsafe(TOKEN_BYTES)}\n".encode())
    return path


@dataclass(frozen=True)
class BrokerAuth:
    """The broker's users: each name's password file, and the server's config blocks."""

    password_files: dict[str, Path]
    config_text: str


def broker_auth(directory: str | Path, workers: Sequence[tuple[str, Role]],
                hashed: bool = False) -> BrokerAuth:
    """One broker user per worker `(worker id, role)` plus `admin` and `planner`, with
    the permissions of queue/permissions.py; passwords in `directory/<name>.nats-password`
    (kept when present), TLS from `directory/server.pem` (`init_certs` first). `hashed`:
    the config holds bcrypt hashes (nats-server checks `$2b$` passwords with bcrypt), so
    reading it reveals no password; each login then costs the broker a bcrypt check."""
    path = Path(directory)
    users = [*workers, ("admin", "admin"), ("planner", "planner")]
    names = [name for name, _ in users]
    if len(set(names)) != len(names):
        raise CertsError(f"broker users must be unique, got {names}")
    for name, _ in workers:
        validate_worker_id(name)  # before any file is written (routers too: a subject token)
    files = {name: password_file(path, name) for name in names}
    identities = [Identity(name, role, _broker_secret(files[name], hashed)) for name, role in users]
    text = server_config(identities, str(path / "server.pem"), str(path / "server.key"))
    return BrokerAuth(files, text)


def _broker_secret(password_file: Path, hashed: bool) -> str:
    password = password_file.read_text().strip()
    if not hashed:
        return password
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(BCRYPT_ROUNDS)).decode()
