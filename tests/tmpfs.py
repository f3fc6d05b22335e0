"""A real, tiny filesystem to run out of: a tmpfs mounted for one test (needs root).

Write errors are provoked, never mocked: ENOSPC by a tmpfs smaller than what is written,
EROFS by remounting it read-only. Where mounting is not allowed the test is skipped.
"""
from __future__ import annotations

import subprocess

import pytest


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, name) -> a fresh tmpfs of `size` ("64k", "2m") under tmp_path;
    remount(path, options) changes it (e.g. "size=8m", "ro"). Unmounted at the end."""
    mounted = []

    def mount(size: str, name: str = "tmpfs"):
        path = tmp_path / name
        path.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(path)
        return path

    def remount(path, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)

    mount.remount = remount
    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
