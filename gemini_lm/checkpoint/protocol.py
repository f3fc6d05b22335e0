"""The checkpointer face: what the training loop and the failure handler may call.

Two implementations: GEMINI's `gemini.checkpointer.Checkpointer` (a snapshot in memory
every iteration, peers, persistence in the background) and the plain
`training.checkpointing.PersistentCheckpointer` (saves to --save, blocking or --async-save). Like
torchtitan's checkpoint manager, the loop calls `before_update` just before the
optimizer update and `after_step` right after it; nothing else of the checkpointer's
insides (slots, peers, files) is visible to the loop or the handler.
"""
from __future__ import annotations

from typing import Callable, Protocol

# hook(window, iteration): called inside a checkpoint window, for failure injection.
WindowHook = Callable[[str, "int | None"], None]


class Checkpointer(Protocol):
    def restore(self) -> dict | None:
        """At start-up: load the newest state there is (memory, peers, disk) or start fresh.
        Returns the recovery record (gemini/restore.py: source, iteration, phases) for the
        RecoveryReporter, or None when there is nothing to report."""

    def before_update(self) -> None:
        """Just before the optimizer update: the previous snapshot has finished reading the state."""

    def after_step(self, iteration: int) -> None:
        """Right after the update of `iteration`: checkpoint it if it is due."""

    def stats(self) -> dict:
        """Timings of the latest checkpoint, for metrics.jsonl."""

    def flush(self, timeout_s: float) -> int | None:
        """Preemption (SIGTERM, from a non-training thread): write the newest complete state to
        --save if that is newer than what is there; the iteration written, or None."""

    def set_window_hook(self, hook: WindowHook) -> None:
        """Failure injection: run `hook` inside each checkpoint window this checkpointer has."""

    def memory_store(self) -> tuple[str, int] | None:
        """This machine's in-memory snapshot directory and the bytes it holds now (None: no
        memory store), for the console: where it is, how big, how to free it."""

    def close(self, iteration: int, clean: bool) -> None:
        """Drain background work; a clean finish leaves the final state on disk."""
