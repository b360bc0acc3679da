"""The handshake, both ends: cluster key proofs (when a key is set), then hello -> welcome.

    master                                   worker
    AuthChallenge(Nm)            ->                        (only with a cluster key)
                                 <-  AuthResponse(Nw, HMAC(key, "worker" Nm Nw))
    AuthProof(HMAC(key, "master" Nm Nw)) ->
    Hello(fingerprint, master)   ->
                                 <-  Welcome(fingerprint, worker, blocks, device, dtype)

Every frame of it fits in HANDSHAKE_MAX_FRAME_BYTES, and the transport holds a link to that limit
until this succeeds. Either side answers a refusal with an ErrorMessage naming the cause and fix.
"""

from __future__ import annotations

from cake.errors import CakeError, Code, WorkerError, WorkerLoading, WorkerLost
from cake.topology import Node
from cake.wire.auth import check_proof, new_nonce, proof
from cake.wire.protocol import (
    PROTOCOL_VERSION,
    AuthChallenge,
    AuthProof,
    AuthResponse,
    ErrorMessage,
    Hello,
    ProtocolError,
    Welcome,
)
from cake.wire.transport import Link, LinkError

# ---------------------------------------------------------------------------------------------
# Master side


async def greet_worker(
    link: Link,
    node: Node,
    label: str,
    fingerprint: str,
    master_name: str,
    cluster_key: bytes | None,
    timeout: float,
    hint: str = "",
) -> Welcome:
    """Authenticate (if keyed) and say hello; the worker's Welcome, checked against `node`.

    `hint` is added to a failure of the link itself (e.g. what to try if the worker uses TLS).

    WorkerLost for what a retry may fix (timeouts, a dropped connection); WorkerError for a
    refusal or a mismatch that a retry cannot fix.
    """
    try:
        if cluster_key is not None:
            await prove_key(link, label, cluster_key, timeout)
        await link.send(Hello(fingerprint=fingerprint, master=master_name))
        reply = await link.recv(timeout=timeout)
    except TimeoutError:
        raise WorkerLost(f"{label}: handshake timed out after {timeout:.1f}s") from None
    except LinkError as exc:
        raise WorkerLost(f"{label}: handshake failed: {exc}{hint}") from None
    except ProtocolError as exc:
        raise WorkerError(f"{label}: handshake failed: {exc}{hint}") from None
    if isinstance(reply, ErrorMessage):
        raise _refusal(label, reply)
    if not isinstance(reply, Welcome):
        raise WorkerError(f"{label}: expected 'welcome', got {type(reply).__name__}")
    if set(reply.blocks) != set(node.blocks):
        raise WorkerError(
            f"{label} serves blocks {list(reply.blocks)}, but the topology gives it "
            f"{list(node.blocks)}; restart the worker with the same topology file"
        )
    return reply


def _refusal(label: str, reply: ErrorMessage) -> WorkerError:
    """A worker busy with other handshakes may take us in a moment, and one still loading its
    blocks once it has them; any other refusal stands."""
    if reply.code == Code.LOADING:
        return WorkerLoading(f"{label} is {reply.message}")
    error = WorkerLost if reply.code == Code.HANDSHAKE_BUSY else WorkerError
    return error(f"{label} refused the connection: {reply.message}")


async def prove_key(link: Link, label: str, key: bytes, timeout: float) -> None:
    """The master's half of the cluster-key handshake (see cake/wire/auth.py)."""
    master_nonce = new_nonce()
    await link.send(AuthChallenge(nonce=master_nonce))
    reply = await link.recv(timeout=timeout)
    if isinstance(reply, ErrorMessage):
        raise _refusal(label, reply)
    if not isinstance(reply, AuthResponse):
        raise WorkerError(f"{label}: expected 'auth_response', got {type(reply).__name__}")
    if not check_proof(key, "worker", master_nonce, reply.nonce, reply.proof):
        raise WorkerError(
            f"{label}: cluster key mismatch (the worker does not know our key); "
            "use the same --cluster-key / CAKE_CLUSTER_KEY everywhere"
        )
    await link.send(AuthProof(proof=proof(key, "master", master_nonce, reply.nonce)))


# ---------------------------------------------------------------------------------------------
# Worker side


async def greet_master(
    link: Link, welcome: Welcome, cluster_key: bytes | None, timeout: float
) -> Hello:
    """Check the master's key proof (if keyed) and hello, answer with `welcome`.

    Raises CakeError (a refusal, or a ProtocolError: to be sent back as an error of its code,
    then the link closed), LinkError or TimeoutError.
    """
    hello = await receive_hello(link, welcome.worker, cluster_key, timeout)
    return await answer_hello(link, hello, welcome)


async def refuse_while_loading(
    link: Link, name: str, fingerprint: str, cluster_key: bytes | None, timeout: float, status: str
) -> Hello:
    """The handshake of a worker still loading its blocks: the key proof and a hello for this
    model, answered with a `loading` refusal saying how far it is (the master retries)."""
    hello = await receive_hello(link, name, cluster_key, timeout)
    check_hello(name, fingerprint, hello)
    await link.send(ErrorMessage(message=status, code=Code.LOADING.value))
    return hello


async def receive_hello(link: Link, name: str, cluster_key: bytes | None, timeout: float) -> object:
    """The master's first message after its key proof (if keyed): its hello, unchecked."""
    first = await link.recv(timeout=timeout)
    if cluster_key is not None:
        if not isinstance(first, AuthChallenge):
            raise CakeError(
                Code.AUTH_REQUIRED,
                f"worker {name} requires the cluster key: give the master the same "
                "--cluster-key (or CAKE_CLUSTER_KEY)",
            )
        await check_key(link, name, cluster_key, first, timeout)
        hello = await link.recv(timeout=timeout)
    elif isinstance(first, AuthChallenge):
        raise CakeError(
            Code.AUTH_UNSUPPORTED,
            f"worker {name} has no cluster key, but the master sent one: start the "
            "worker with the same --cluster-key, or drop it from the master",
        )
    else:
        hello = first
    return hello


async def answer_hello(link: Link, hello: object, welcome: Welcome) -> Hello:
    """Check the master's hello (after the key proof, if any) and answer with `welcome`."""
    checked = check_hello(welcome.worker, welcome.fingerprint, hello)
    await link.send(welcome)
    return checked


def check_hello(name: str, fingerprint: str, hello: object) -> Hello:
    """The master's hello, if it speaks this protocol version about this model."""
    if not isinstance(hello, Hello):
        raise ProtocolError(f"expected 'hello' first, got {type(hello).__name__!r}")
    if hello.version != PROTOCOL_VERSION:
        raise CakeError(
            Code.VERSION_MISMATCH,
            f"protocol version {hello.version} is not this worker's {PROTOCOL_VERSION}; "
            "run the same cake version on master and workers",
        )
    if hello.fingerprint != fingerprint:
        raise CakeError(
            Code.MODEL_MISMATCH,
            f"worker {name} serves a different model (fingerprint {fingerprint}, "
            f"master has {hello.fingerprint}); start both with the same model",
        )
    return hello


async def check_key(
    link: Link, name: str, key: bytes, challenge: AuthChallenge, timeout: float
) -> None:
    """The worker's half of the cluster-key handshake, once the master's challenge is read."""
    worker_nonce = new_nonce()
    await link.send(
        AuthResponse(nonce=worker_nonce, proof=proof(key, "worker", challenge.nonce, worker_nonce))
    )
    answer = await link.recv(timeout=timeout)
    if not isinstance(answer, AuthProof) or not check_proof(
        key, "master", challenge.nonce, worker_nonce, answer.proof
    ):
        raise CakeError(
            Code.AUTH_FAILED, f"cluster key mismatch: the master's key is not worker {name}'s"
        )
