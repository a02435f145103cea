"""TorchServe stopped while the gateway runs: calls get UNAVAILABLE quickly, health goes
NOT_SERVING; after TorchServe is back (with new keys) calls succeed again, without
restarting the gateway. The gateway runs as its own process, health watcher included."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from support.demo_images import demo_png
from support.gateway import gateway_process, open_channel
from xaiserve.gateway.client import XaiClient

pytestmark = pytest.mark.torchserve

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _health(channel: grpc.Channel) -> int:
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="xaiserve.v1.ExplanationService"), timeout=5
    )
    return reply.status


def _wait_for(channel: grpc.Channel, status: int, timeout: float) -> None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if _health(channel) == status:
            return
        time.sleep(0.2)
    raise AssertionError(f"health is not {status} after {timeout} s")


def test_gateway_survives_a_torchserve_restart(torchserve) -> None:
    config = torchserve.config
    flags = [
        "--backend",
        "torchserve",
        "--torchserve-target",
        config.grpc_target,
        "--torchserve-key-file",
        str(config.key_file),
        "--torchserve-models",
        "demo,tiny",
        "--metrics-port",
        "0",
    ]
    with (
        gateway_process(*flags) as gateway,
        XaiClient(gateway.target, timeout=30) as client,
        open_channel(gateway.target) as channel,
    ):
        _wait_for(channel, SERVING, 20)
        assert client.explain(demo_png(0)).model_name == "demo"

        torchserve.stop()
        try:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                client.explain(demo_png(0))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started < 3
            _wait_for(channel, NOT_SERVING, 20)
        finally:
            torchserve.start()  # new keys in the key file
        _wait_for(channel, SERVING, 30)
        response = client.explain(demo_png(1), methods=("grad_cam",))
        assert response.model_name == "demo" and len(response.explanations) == 1
    log = "".join(gateway.log)
    assert "health: NOT_SERVING" in log and "inference key changed" in log
