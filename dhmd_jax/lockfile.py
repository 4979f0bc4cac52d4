"""Exclusive locks on lock files: the workdir's lock and the feature cache's build lock.

A lock is an exclusive `flock` on a file, which the kernel releases when the process ends
however it ends (SIGKILL included). The holder removes the file when it lets go, so no lock
file stays behind; a process that opened the file just before it was removed then holds a lock
on a removed file while a third process may lock a new one, so `acquire` checks that the file
it locked is still the one at the path and tries again if not.
"""

import errno
import fcntl
import os


class FlockFailed(OSError):
  """flock itself failed on an opened lock file (not because another process holds it): e.g. a
  file system without flock. `errno` is flock's."""


def acquire(path, *, wait: bool, read_busy=None):
  """Holds an exclusive flock on `path` (created if missing).

  Returns (fd, None) when this process holds it now. With `wait` False and another process
  holding it, returns (None, read_busy(fd)) (None without `read_busy`), where `read_busy` gets
  the open lock file before it is closed (to read what the holder wrote there); with `wait` True
  it waits for the holder instead. Let go with `release(path, fd)`.

  Raises OSError when the file cannot be opened (e.g. a read-only folder), FlockFailed when
  flock fails otherwise.
  """
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError as error:
      busy = not wait and error.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
      holder = read_busy(fd) if busy and read_busy is not None else None
      os.close(fd)
      if busy:
        return None, holder
      raise FlockFailed(error.errno, error.strerror) from None
    try:
      current = os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
      current = False
    if current:
      return fd, None
    os.close(fd)  # locked a file its holder removed meanwhile: lock the one at the path now


def release(path, fd):
  """Removes the lock file (while still holding it, so no other process holds this file) and
  lets go of the lock."""
  try:
    os.unlink(path)
  except OSError:
    pass
  os.close(fd)
