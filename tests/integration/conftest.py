from nats_fixtures import nats_conn, nats_server  # noqa: F401
