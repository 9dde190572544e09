"""Admin.Reload and Admin.GetConfig on a server started without a config file."""

from __future__ import annotations

import json

import pytest
import yaml
from grpc_fixtures import GRPCURL, SPLITSERVE, GrpcWorker, run_tool

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


async def test_reload_without_a_config_file_is_failed_precondition(
        grpc_worker: GrpcWorker) -> None:
    rc, _, err = await run_tool(GRPCURL, "-plaintext", grpc_worker.address,
                                "splitserve.v1.Admin/Reload")
    assert rc != 0
    assert "Code: FailedPrecondition" in err
    assert "cannot reload: this server was started without a config file" in err

    rc, out, err = await run_tool(SPLITSERVE, "admin", "reload", "--target",
                                  grpc_worker.address)
    assert rc == 1 and out == ""
    assert err.startswith("Error: FAILED_PRECONDITION: cannot reload:"), err


async def test_get_config_shows_the_engine_config(grpc_worker: GrpcWorker) -> None:
    rc, out, err = await run_tool(GRPCURL, "-plaintext", grpc_worker.address,
                                  "splitserve.v1.Admin/GetConfig")
    assert rc == 0, err
    reply = json.loads(out)
    status = await grpc_worker.status()
    assert reply["config_hash"] == status.config_hash
    engine = yaml.safe_load(reply["config_yaml"])["engine"]
    assert (engine["num_pages"], engine["page_size"], engine["dtype"]) == (64, 16, "float32")

    rc, out, err = await run_tool(SPLITSERVE, "admin", "config", "--target",
                                  grpc_worker.address)
    assert rc == 0, err
    assert yaml.safe_load(out) == yaml.safe_load(reply["config_yaml"])
