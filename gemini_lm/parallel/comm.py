"""Where a peer's failure is detected: torch.distributed calls that raise PeerLostError.

gloo reports a dead or unreachable peer as a plain RuntimeError (NCCL and the store use
torch's DistError family). Every collective and point-to-point call on the training
path runs inside `peer_failures(...)`, so whatever such a call raises leaves it as a
PeerLostError that the failure handler recognises by its type; a bug elsewhere keeps
its own type and is never mistaken for a lost peer.
"""
from __future__ import annotations

import contextlib

from gemini_lm.errors import PeerFailure, PeerLostError


@contextlib.contextmanager
def peer_failures(what: str):
    """Turn an error of the torch.distributed call(s) inside into PeerLostError."""
    try:
        yield
    except PeerFailure:
        raise
    except RuntimeError as exc:   # DistError and its subclasses are RuntimeErrors too
        raise PeerLostError(f"{what}: {exc}") from exc


def wait(work, what: str) -> None:
    """`work.wait()` of an async operation, its failure typed like the call's."""
    with peer_failures(what):
        work.wait()
