"""The memory store never follows a link and never writes through a file it did not create
(issue 13, item 2): whatever is planted in or above a job's store directory, the store
refuses it with a UsageError and the planted target keeps its bytes and its mode."""
import os
import stat

import pytest

from gemini_lm.errors import UsageError
from gemini_lm.gemini.store import MemoryStore
from tests.gemini.test_store import LAYOUT, _snapshot


@pytest.fixture
def victim(tmp_path):
    """A file outside any store that a planted link points at."""
    path = tmp_path / "victim.txt"
    path.write_text("precious")
    os.chmod(path, 0o644)
    return path


def _untouched(victim) -> bool:
    return victim.read_text() == "precious" and stat.S_IMODE(os.stat(victim).st_mode) == 0o644


def _machine_dir(tmp_path) -> str:
    """A store's machine directory as an earlier run left it (created, nothing in it)."""
    MemoryStore(str(tmp_path / "shm"), "job1", "m0").close()
    return str(tmp_path / "shm" / "job1" / "m0")


@pytest.mark.parametrize("name", ["tp00.a.bin", "tp00.b.bin", ".tp00.a.commit.json.tmp", "tp00.a.commit.json"])
def test_a_link_planted_in_the_machine_directory_is_refused(tmp_path, victim, name):
    os.symlink(victim, os.path.join(_machine_dir(tmp_path), name))
    with pytest.raises(UsageError, match="link|not a regular file"):
        store = MemoryStore(str(tmp_path / "shm"), "job1", "m0")
        store.prepare("tp00", LAYOUT.nbytes)
        _snapshot(store, 1)
        _snapshot(store, 2)
    assert _untouched(victim)


def test_a_hard_link_to_a_file_elsewhere_is_refused(tmp_path, victim):
    os.link(victim, os.path.join(_machine_dir(tmp_path), "tp00.a.bin"))
    os.chmod(victim, 0o600)   # even one with the store's own mode
    with pytest.raises(UsageError):
        store = MemoryStore(str(tmp_path / "shm"), "job1", "m0")
        _snapshot(store, 1)
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("level", ["root", "job", "machine"])
def test_a_directory_replaced_by_a_link_is_refused(tmp_path, level):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    path = {"root": tmp_path / "shm", "job": tmp_path / "shm" / "job1",
            "machine": tmp_path / "shm" / "job1" / "m0"}[level]
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.symlink(elsewhere, path)
    with pytest.raises(UsageError, match="link"):
        _snapshot(MemoryStore(str(tmp_path / "shm"), "job1", "m0"), 1)
    assert list(elsewhere.iterdir()) == []


def test_a_store_directory_that_is_a_file_is_one_error(tmp_path):
    (tmp_path / "shm").write_text("not a directory")
    with pytest.raises(UsageError, match="not a directory"):
        MemoryStore(str(tmp_path / "shm"), "job1", "m0")


@pytest.mark.skipif(os.getuid() != 0, reason="giving a directory to another user needs root")
@pytest.mark.parametrize("level", ["root", "job", "machine", "parent"])
def test_a_directory_owned_by_another_user_is_refused(tmp_path, level):
    MemoryStore(str(tmp_path / "parent" / "shm"), "job1", "m0").close()
    path = {"parent": tmp_path / "parent", "root": tmp_path / "parent" / "shm",
            "job": tmp_path / "parent" / "shm" / "job1",
            "machine": tmp_path / "parent" / "shm" / "job1" / "m0"}[level]
    os.chown(path, 4242, 4242)
    with pytest.raises(UsageError, match="owned by"):
        MemoryStore(str(tmp_path / "parent" / "shm"), "job1", "m0")


def test_a_root_others_may_write_to_is_refused(tmp_path):
    root = tmp_path / "shm"
    root.mkdir()
    os.chmod(root, 0o777)   # anyone could swap a job directory for a link
    with pytest.raises(UsageError, match="writable by others"):
        MemoryStore(str(root), "job1", "m0")


def test_every_directory_the_store_creates_is_owner_only(tmp_path):
    old = os.umask(0o022)
    try:
        store = MemoryStore(str(tmp_path / "a" / "shm"), "job1", "m0")
        _snapshot(store, 1)
    finally:
        os.umask(old)
    for d in (tmp_path / "a", tmp_path / "a" / "shm", tmp_path / "a" / "shm" / "job1", store.path):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, d
    store.close()


def test_wipe_removes_the_empty_root_and_nothing_beside_it(tmp_path):
    store = MemoryStore(str(tmp_path / "shm"), "job1", "m0")
    _snapshot(store, 1)
    other = MemoryStore(str(tmp_path / "shm"), "job2", "m0")
    store.wipe()
    assert os.path.isdir(other.path)            # another job's store stays, and so does the root
    other.wipe()
    assert not (tmp_path / "shm").exists()      # the last one out removes the empty root
