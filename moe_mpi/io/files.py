"""File mechanics the writers and readers share: a file written whole under a temporary name, and
whether another process is writing a file."""
from __future__ import annotations

import errno
import fcntl
import os
from contextlib import contextmanager


@contextmanager
def written_whole(path: str):
    """Yields a temporary name beside ``path`` to write; on success it is renamed to ``path``, on any
    failure removed: ``path`` never holds a half-written file."""
    tmp = f"{path}.tmp"
    try:
        yield tmp
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def held_for_writing(path: str) -> bool:
    """Whether another process holds the file open for writing, as HDF5 shows it: a read-write open
    takes an exclusive flock, so a shared one cannot be had.  False where HDF5's locking is off
    (HDF5_USE_FILE_LOCKING=FALSE) or the file system has no flock."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    finally:
        os.close(fd)            # closing drops the shared lock, if taken
    return False
