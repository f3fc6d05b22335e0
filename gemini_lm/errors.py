"""Errors the command-line front ends turn into one line and exit code 2."""


class UsageError(Exception):
    """Bad user input: the CLI prints the message and exits 2."""
