"""Client library for the littlebig service over Triton gRPC (tritonclient, numpy, Pillow; never torch)."""

from littlebig.client.client import (
    Classification,
    ClientError,
    InputError,
    LittleBigClient,
    ServerUnavailable,
    Service,
)

__all__ = [
    "Classification",
    "ClientError",
    "InputError",
    "LittleBigClient",
    "ServerUnavailable",
    "Service",
    "AsyncLittleBigClient",
]


def __getattr__(name: str):
    if name == "AsyncLittleBigClient":  # grpc.aio is only imported by those who use it
        from littlebig.client.aio import AsyncLittleBigClient

        return AsyncLittleBigClient
    raise AttributeError(name)
