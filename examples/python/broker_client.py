"""What every jobbroker example in Python shares: a channel with retries and keepalive, and readable errors.

The stubs (`jobbroker.v1.*_pb2`) are generated from the repository's proto/ by grpcio-tools; examples/setup.sh
does it and puts them on its venv's path (see README.md).
"""

import json
import os

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from jobbroker.v1 import broker_pb2 as pb  # noqa: F401  (re-exported: `from broker_client import pb`)
from jobbroker.v1 import broker_pb2_grpc
from jobbroker.v1 import job_pb2 as job_pb  # noqa: F401

DEFAULT_BROKER = os.environ.get("JOBBROKER_BROKER", "127.0.0.1:50051")

# gRPC's retry policy (https://grpc.io/docs/guides/retry/): the channel itself retries UNAVAILABLE (broker
# restarting, connection refused) with exponential backoff, within each call's deadline. No other code is retried:
# INVALID_ARGUMENT, NOT_FOUND, ABORTED and the rest mean the same on every attempt.
SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [{"service": "jobbroker.v1.BrokerService"}],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.2s",
                "maxBackoff": "5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}


def connect(address: str = DEFAULT_BROKER) -> broker_pb2_grpc.BrokerServiceStub:
    """A BrokerService stub on a plaintext channel to `address` (`host:port`; an `http://` prefix is accepted)."""
    target = address.removeprefix("http://")
    channel = grpc.insecure_channel(
        target,
        options=[
            ("grpc.enable_retries", 1),
            ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
            # Notice a vanished broker on an idle stream (a worker waiting for jobs) within ~30 s.
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
        ],
    )
    return broker_pb2_grpc.BrokerServiceStub(channel)


def describe_error(error: grpc.RpcError) -> str:
    """The status code and message, then one line per detail the broker attached: each bad field of a
    google.rpc.BadRequest (INVALID_ARGUMENT), the reason of an ErrorInfo (ABORTED: LEASE_LOST)."""
    lines = [f"{error.code().name}: {error.details()}"]
    status = rpc_status.from_call(error)
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            lines += [f"  bad field {v.field}: {v.description}" for v in bad_request.field_violations]
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            lines.append(f"  reason {info.reason} ({info.domain})")
    return "\n".join(lines)
