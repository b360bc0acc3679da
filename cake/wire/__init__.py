"""Master <-> worker over TCP: the sans-IO protocol, the transport, the handshake and its
authentication, channels with liveness, the worker's side of a connection, discovery."""
