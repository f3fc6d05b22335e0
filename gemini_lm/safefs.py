"""Private directories and files, opened without following links planted by someone else.

The memory store lives in shared places (/dev/shm, /tmp) where other users may create
names, and tools delete stores. So everything here works relative to directory
descriptors, opens every name with O_NOFOLLOW, creates files with O_EXCL, and checks
owner and mode of every directory on the way. Anything unexpected is a UsageError
(one line, exit 2): the project never writes through, or deletes behind, a name it
cannot prove it created.

Trust, from "/" down to a private directory:
- every directory above it: owned by root or this user, and writable by no one else
  unless sticky (/tmp, /dev/shm); a symbolic link on the way (e.g. /var/run) only if
  root or this user owns it;
- the private directory and everything below it: real directories (no link) owned by
  this user; the ones we create are 0700; group or others may never write to them;
- files in it: regular, owned by this user, one link, no group/other permission bits.
"""
from __future__ import annotations

import errno
import os
import shutil
import stat

from gemini_lm.errors import UsageError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _who(uid: int) -> str:
    return "root" if uid == 0 else f"uid {uid}"


def _check_dir(st: os.stat_result, path: str, private: bool) -> None:
    me = os.getuid()
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{path}: not a directory")
    if st.st_uid != me and (private or st.st_uid != 0):
        raise UsageError(f"{path}: owned by {_who(st.st_uid)}, not by this user ({_who(me)})")
    if st.st_mode & 0o022 and not (st.st_mode & stat.S_ISVTX and not private):
        raise UsageError(f"{path}: writable by others (mode {stat.S_IMODE(st.st_mode):o}): "
                         f"anyone could replace what is in it")


def _open_step(parent_fd: int, name: str, path: str, create: bool, private: bool) -> int:
    """One directory below `parent_fd`, created 0700 if missing and `create`."""
    while True:
        try:
            fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent_fd)
            break
        except FileNotFoundError:
            if not create:
                raise
            try:
                os.mkdir(name, 0o700, dir_fd=parent_fd)
            except FileExistsError:
                pass   # made by a concurrent process meanwhile: open and check it
            else:
                fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent_fd)
                os.fchmod(fd, 0o700)   # mkdir's mode passes through the umask
                break
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            st = os.lstat(name, dir_fd=parent_fd)
            if not stat.S_ISLNK(st.st_mode):
                raise UsageError(f"{path}: not a directory") from None
            if private or st.st_uid not in (0, os.getuid()):
                raise UsageError(f"{path}: is a symbolic link (owned by {_who(st.st_uid)}); "
                                 f"the store never follows one: pass the real directory") from None
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)   # a system link such as /var/run
            break
    try:
        _check_dir(os.fstat(fd), path, private)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_private_dir(path: str, create: bool = True, below: tuple[str, ...] = ()) -> list[int]:
    """Descriptors [parent of `path`, `path`, *each of `below` under it] (`path` and `below`
    private directories), walked from "/" without following links another user could plant;
    missing directories are created 0700 when `create`, else FileNotFoundError. The caller
    closes the descriptors."""
    path = os.path.abspath(path)
    parts = [p for p in path.split("/") if p]
    if not parts:
        raise UsageError("/: not a place for a private directory")
    fds = [os.open("/", _DIR_FLAGS)]
    try:
        walked = ""
        for i, name in enumerate(parts + list(below)):
            walked += "/" + name
            fd = _open_step(fds[-1], name, walked, create, private=i >= len(parts) - 1)
            if i < len(parts) - 1:
                os.close(fds.pop())   # above the parent: only the way down is kept
            fds.append(fd)
        return fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def tighten(fd: int) -> None:
    """A private directory of ours that lets group or others read: make it owner-only."""
    if os.fstat(fd).st_mode & 0o077:
        os.fchmod(fd, 0o700)


def check_private_file(fd: int, what: str) -> os.stat_result:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{what}: not a regular file")
    if st.st_uid != os.getuid():
        raise UsageError(f"{what}: owned by {_who(st.st_uid)}, not by this user")
    if st.st_nlink != 1:
        raise UsageError(f"{what}: has {st.st_nlink} hard links; the store never writes through a shared file")
    if st.st_mode & 0o077:
        raise UsageError(f"{what}: mode {stat.S_IMODE(st.st_mode):o}, not created by the store (0600)")
    return st


def open_file(dir_fd: int, name: str, flags: int, what: str) -> int:
    """An existing file of a private directory, opened without following a link, checked."""
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UsageError(f"{what}: is a symbolic link; the store never follows one") from None
        raise
    try:
        check_private_file(fd, what)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_file(dir_fd: int, name: str, flags: int, what: str) -> int:
    """A new file (0600) that did not exist: O_EXCL, so nothing planted is written through."""
    try:
        fd = os.open(name, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    except FileExistsError:
        raise UsageError(f"{what}: appeared while the store created it") from None
    os.fchmod(fd, 0o600)
    return fd


def open_or_create_file(dir_fd: int, name: str, flags: int, what: str) -> int:
    try:
        return open_file(dir_fd, name, flags, what)
    except FileNotFoundError:
        return create_file(dir_fd, name, flags, what)


def lstat_entry(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def remove_file(dir_fd: int, name: str, what: str) -> None:
    """Remove a name that must be one of our files (a link or anything else is an error)."""
    st = lstat_entry(dir_fd, name)
    if st is None:
        return
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
        raise UsageError(f"{what}: not a regular file of this user (planted?); left alone")
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def remove_tree(dir_fd: int, name: str) -> None:
    """Delete directory `name` below `dir_fd` and everything in it, following no link
    (shutil.rmtree with a dir_fd refuses a link at `name` and never descends into one)."""
    try:
        shutil.rmtree(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def remove_empty_dir(dir_fd: int, name: str) -> bool:
    """rmdir: only an empty directory goes (another job may still use it otherwise)."""
    try:
        os.rmdir(name, dir_fd=dir_fd)
        return True
    except OSError:
        return False
