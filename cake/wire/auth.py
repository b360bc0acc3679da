"""Who may talk to a worker: the cluster key (mutual HMAC challenge-response) and TLS contexts.

The key proves, in both directions, that the peer knows the shared secret, without sending it:
each side answers a fresh random nonce chosen by the other. It authenticates the handshake; it
does not encrypt or protect the frames after it. TLS (the standard `ssl` module) does that.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import ssl

from cake.wire.protocol import AUTH_NONCE_BYTES


def cluster_key(value: str | None) -> bytes | None:
    """The key as bytes (None when unset); an empty key is a mistake, not 'no key'."""
    if value is None:
        return None
    if not value:
        raise ValueError("--cluster-key / CAKE_CLUSTER_KEY is empty; give a long random secret")
    return value.encode("utf-8")


def new_nonce() -> bytes:
    return os.urandom(AUTH_NONCE_BYTES)


def proof(key: bytes, role: str, master_nonce: bytes, worker_nonce: bytes) -> bytes:
    """HMAC-SHA256 over the role and both nonces; the role stops a proof being reflected."""
    return hmac.new(
        key, role.encode() + b"\0" + master_nonce + worker_nonce, hashlib.sha256
    ).digest()


def check_proof(
    key: bytes, role: str, master_nonce: bytes, worker_nonce: bytes, given: bytes
) -> bool:
    return hmac.compare_digest(proof(key, role, master_nonce, worker_nonce), given)


def server_tls(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """The worker's TLS context from --tls-cert/--tls-key (both or neither)."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ValueError("TLS needs both --tls-cert and --tls-key on the worker")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load --tls-cert {cert} / --tls-key {key}: {exc}") from None
    return context


def client_tls(ca: str | None) -> ssl.SSLContext | None:
    """The master's TLS context: trust only --tls-ca (a CA, or the worker's own certificate to
    pin it). The worker's certificate must name the host the topology uses for it."""
    if ca is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load --tls-ca {ca}: {exc}") from None
    return context
