"""Memory that two processes of one machine map: the weight sync's same-machine
transport.

Learner rank 0 packs each bucket of a weight update straight into a region it
created, and the rollout actors on its machine read the bucket where it lies,
so a bucket crosses no socket and is copied once, not three times (into gloo's
send buffer, out of its receive buffer, into the engine). The group still
carries a small header per bucket, which orders the writes before the reads.

A region is anonymous memory (`memfd_create`): it has no name in /dev/shm or
anywhere else, so no kill at any moment can leave it behind, and /dev/shm's
size (Docker's default is 64 MiB) does not limit it. An actor maps it through
the creator's open descriptor, `/proc/<pid>/fd/<fd>`, and checks the link's
name carries the region's random token, so a process on another machine that
happens to have the same pid and descriptor number is never taken for it. Once
every actor has mapped it, the creator closes its descriptor
(`release_address`); the kernel frees the memory when the last process unmaps
it or exits. Space is reserved at creation (`posix_fallocate`), so a machine
short of memory fails there rather than with a SIGBUS while writing.

Linux only. Imports only torch and the standard library.
"""

from __future__ import annotations

import mmap
import os
import secrets

import torch


def _memfd_name(token: int) -> str:
    return f"flywheel-weights-{token:016x}"


class SharedRegion:
    """`nbytes` of shared memory mapped into this process, as a flat uint8 tensor (`tensor`)."""

    def __init__(self, fd: int, nbytes: int):
        self.nbytes = nbytes
        self._map = mmap.mmap(fd, nbytes)  # MAP_SHARED: both processes see one set of pages
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)
        self._fd: int | None = None  # the creator's descriptor, open until every actor has mapped it
        self.token = 0

    @classmethod
    def create(cls, nbytes: int) -> "SharedRegion":
        """A new region of `nbytes` (raises OSError, ENOSPC or ENOMEM included, if the machine cannot hold it)."""
        token = secrets.randbits(63)  # one int64 on the wire
        fd = os.memfd_create(_memfd_name(token), os.MFD_CLOEXEC)
        try:
            os.posix_fallocate(fd, 0, nbytes)
            region = cls(fd, nbytes)
        except BaseException:
            os.close(fd)  # the memory goes with its only descriptor
            raise
        region._fd, region.token = fd, token
        return region

    def address(self) -> tuple[int, int, int]:
        """(pid, descriptor, token): what another process of this machine needs to `attach`."""
        if self._fd is None:
            raise RuntimeError("the region's address was released: it can no longer be attached")
        return os.getpid(), self._fd, self.token

    @classmethod
    def attach(cls, pid: int, fd: int, token: int, nbytes: int) -> "SharedRegion":
        """Map the region another process of this machine created (OSError if there is none at that
        address: another machine, another pid namespace, or a size that disagrees)."""
        path = f"/proc/{pid}/fd/{fd}"
        if not os.readlink(path).startswith(f"/memfd:{_memfd_name(token)}"):
            raise FileNotFoundError(f"{path} is not region {token:016x}: the learner runs on another machine")
        own = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(own).st_size
            if size != nbytes:
                raise OSError(f"region {token:016x} holds {size} bytes, the update's layout {nbytes}")
            region = cls(own, nbytes)
        finally:
            os.close(own)  # the mapping holds the memory
        region.token = token
        return region

    def release_address(self) -> None:
        """Close the creator's descriptor once every actor has mapped the region; the mappings stay."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        """Let the mapping go. Every view of `tensor` holds the mapping (torch keeps a reference to
        the buffer), so it is unmapped when the last view dies, never under one: an explicit
        `mmap.close()` would unmap at once, since torch holds no buffer export that would stop it."""
        self.release_address()
        self.tensor = None
        self._map = None
