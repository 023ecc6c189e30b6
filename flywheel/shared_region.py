"""A file in /dev/shm that two processes of one machine map: the weight sync's
same-node transport.

Learner rank 0 packs each bucket of a weight update straight into a region it
created, and the rollout actors on its machine read the bucket where it lies,
so a bucket crosses no socket and is copied once, not three times (into gloo's
send buffer, out of its receive buffer, into the engine). The group still
carries a small header per bucket, which orders the writes before the reads.

A region lives only while it is mapped: the learner removes its name as soon
as every actor has mapped it (or failed to), so a run killed by SIGKILL leaves
nothing in /dev/shm, and the kernel frees the memory when the last process
unmaps it or exits. Space is reserved at creation (`posix_fallocate`), so a
/dev/shm too small for the model (Docker's default is 64 MiB) fails there with
ENOSPC rather than with a SIGBUS while writing.

Imports only torch and the standard library.
"""

from __future__ import annotations

import mmap
import os
import secrets

import torch

SHM_DIR = "/dev/shm"


def region_path(token: int) -> str:
    """The region file of one weight-transfer group's update layout."""
    return os.path.join(SHM_DIR, f"flywheel-weights-{token:016x}")


def new_token() -> int:
    """A random name for a region (63 bits, so it travels as one int64)."""
    return secrets.randbits(63)


class SharedRegion:
    """`nbytes` of shared memory mapped into this process, as a flat uint8 tensor (`tensor`)."""

    def __init__(self, path: str, nbytes: int, create: bool):
        self.path, self.nbytes = path, nbytes
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            if create:
                try:
                    os.posix_fallocate(fd, 0, nbytes)
                except OSError:
                    os.unlink(path)
                    raise
            elif os.fstat(fd).st_size != nbytes:
                raise OSError(f"{path} holds {os.fstat(fd).st_size} bytes, expected {nbytes}")
            self._map = mmap.mmap(fd, nbytes)  # MAP_SHARED: both processes see one set of pages
        finally:
            os.close(fd)
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)

    @classmethod
    def create(cls, token: int, nbytes: int) -> "SharedRegion":
        """A new region of `nbytes` (raises OSError, ENOSPC included, if /dev/shm cannot hold it)."""
        return cls(region_path(token), nbytes, create=True)

    @classmethod
    def attach(cls, token: int, nbytes: int) -> "SharedRegion":
        """Map the region another process created (raises OSError if this machine has no such file)."""
        return cls(region_path(token), nbytes, create=False)

    def unlink(self) -> None:
        """Remove the region's name; the memory stays mapped until every process closes it."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Let the mapping go. Every view of `tensor` holds the mapping (torch keeps a reference to
        the buffer), so it is unmapped when the last view dies, never under one: an explicit
        `mmap.close()` would unmap at once, since torch holds no buffer export that would stop it."""
        self.tensor = None
        self._map = None
