"""Dataset indices cached on disk, as Megatron does: built once, then memory-mapped.

Building a GPT dataset's document, sample and shuffle indices is a pure function of the
corpus and a few flags, and for a large corpus it takes long enough to matter at every
restart. They are kept as .npy files under `$GEMINI_LM_CACHE/indices` (default
~/.cache/gemini_lm/indices), named by a hash of everything they depend on (the corpus
files' size and modification time included), written atomically, and read back
memory-mapped. An unwritable cache only means building them again.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable

import numpy as np

from gemini_lm.data.indexed_dataset import data_file_path, index_file_path

VERSION = 1   # bump when the way an index is built changes


def cache_dir() -> str:
    root = os.environ.get("GEMINI_LM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gemini_lm")
    return os.path.join(root, "indices")


def cache_key(kind: str, path_prefix: str, **params) -> str:
    files = {}
    for path in (data_file_path(path_prefix), index_file_path(path_prefix)):
        st = os.stat(path)
        files[os.path.abspath(path)] = [st.st_size, st.st_mtime_ns]
    blob = json.dumps({"kind": kind, "version": VERSION, "files": files, **params}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cached(key: str, names: tuple[str, ...], build: Callable[[], tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """The arrays `names` of `key` from the cache, else `build()` them and cache them."""
    d = cache_dir()
    paths = [os.path.join(d, f"{key}-{name}.npy") for name in names]
    try:
        return tuple(np.load(p, mmap_mode="r", allow_pickle=False) for p in paths)
    except (OSError, ValueError):
        pass
    arrays = build()
    try:
        os.makedirs(d, exist_ok=True)
        for path, array in zip(paths, arrays):
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "wb") as f:
                np.save(f, array, allow_pickle=False)
            os.replace(tmp, path)   # whole files only: a concurrent rank reads old or new, never half
    except OSError:
        pass
    return arrays
