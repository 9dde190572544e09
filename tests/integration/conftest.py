from grpc_fixtures import grpc_worker, grpc_worker_factory  # noqa: F401
from nats_fixtures import nats_conn, nats_server  # noqa: F401
