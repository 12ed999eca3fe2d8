"""Message-size limits on both protocols, derived from ``Settings`` in one place.

A request carries at most ``max_request_bytes`` of tensor or image payload; the gRPC transport limit adds a fixed
allowance for the message's other fields, so a payload at the limit still gets through and the service (not the
transport) says which field is too large. The same limit bounds responses: a service refuses to build a response
larger than it (asking for fewer images or layers) instead of letting the transport fail.
"""

from __future__ import annotations

from typing import NamedTuple

ENVELOPE_BYTES = 1 << 20
"""Allowance for everything in a message besides its tensor/image payloads."""

PROXY_MESSAGE_SIZE_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"
"""Environment variable Ray Serve's gRPC proxy reads (at start) for its send and receive limits."""


class Limits(NamedTuple):
    """Request limits every service enforces (from ``Settings``)."""

    max_request_bytes: int
    """Largest tensor/image payload of one request (and of one response)."""
    max_batch_images: int
    """Most images one request may carry."""
    max_tensor_elements: int
    """Most elements one decoded tensor may have."""

    @classmethod
    def from_settings(cls, settings) -> Limits:
        return cls(settings.max_request_bytes, settings.max_batch_images, settings.max_tensor_elements)

    @property
    def grpc_message_bytes(self) -> int:
        """Transport limit for one gRPC message (proxy and clients)."""
        return min(self.max_request_bytes + ENVELOPE_BYTES, (1 << 31) - 1)


def grpc_channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel options for clients so that they accept what the proxy may send."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
