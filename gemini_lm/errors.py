"""Errors and exit codes the command-line front ends share.

Exit codes: 0 done; 2 bad input (one line on stderr, no traceback); EXIT_UNSAVED (3) when
training finished but its final persist failed (one line: where the state is kept); EXIT_RESTART when a
failure was detected and the worker wants its agent (torchrun) to restart it; EXIT_REFORK
between a supervised training process and its supervisor only.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_UNSAVED = 3     # training finished but its final state could not be written to --save
EXIT_RESTART = 75   # EX_TEMPFAIL: "failure detected, restart me"
EXIT_REFORK = 76    # a supervised training process: "a peer failed before I could recover in place:
                    # re-fork me warm" (never seen by torchrun: the supervisor acts on it)


class UsageError(Exception):
    """Bad user input: the CLI prints the message and exits 2."""


class PeerFailure(RuntimeError):
    """Another process or the network failed; recovering (not debugging) fixes it.

    Raised where a failure is detected — a torch.distributed call that failed
    (parallel/comm.py), a replication stream that broke, the hang watchdog — and
    classified by type alone: never by the text of an exception message.
    """


class PeerLostError(PeerFailure):
    """A collective or point-to-point operation failed: a peer died or its connection broke."""


class ReplicationError(PeerFailure):
    """A checkpoint stream to or from a peer machine broke."""


class UsageArgumentParser(argparse.ArgumentParser):
    """argparse prints usage + error and exits 2; under run_cli this prints one line and exits 2.
    Every float flag of every tool refuses nan and inf: no flag means them, and nan passes
    every range check (each comparison is False)."""

    def error(self, message):
        raise UsageError(message)

    def _get_value(self, action, arg_string):
        value = super()._get_value(action, arg_string)
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentError(action, f"{arg_string!r} is not a finite number")
        return value


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """States an option's default once: appended unless its help already states it, or
    there is nothing to state (None, a flag's True/False, an empty list)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("(default" in text or not action.option_strings or default is None or default == []
                or isinstance(default, bool) or default is argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def run_cli(main: Callable[[], int | None], hard_exit: bool = False) -> None:
    """Run an entry point: UsageError → one line + exit 2, otherwise main's exit code.

    `hard_exit` (training entry points): once main() has returned, everything is written
    and closed, so skip the interpreter's teardown — gloo's C++ threads can abort an
    already finished process there (SIGABRT, pytorch/pytorch#179291), and torchrun would
    take a finished worker for a failed one and restart it.
    """
    try:
        code = main()
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        code = 130
    code = code or 0
    if hard_exit:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
