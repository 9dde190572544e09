"""splitserve.control: gRPC servicers (Generation, Admin), health, status mapping.

- `server.start_grpc_server`: one grpc.aio server with reflection and health.
- `generation.GenerationServicer`: `splitserve.v1.Generation` over a GenerationService.
- `admin.AdminServicer` over an `backend.AdminBackend`; `local_admin.LocalAdminBackend`
  for a worker whose engine runs in-process.
- `status.status_for`: the only mapping from typed errors to gRPC status codes.
"""
