"""The memory allocator of the learner's processes (`learner.allocator`).

A training step allocates and frees the same large buffers at every optimiser step:
DeepSpeed's float32 copy of the gradient partition (4 bytes per parameter), the
activations kept for the backward pass, the logits. glibc serves every allocation
above 32 MiB with a fresh mapping and unmaps it when freed, so the kernel faults
each page in again at every step. jemalloc, told to keep the pages it frees
(`JEMALLOC_CONF`), hands the same pages back instead. Ray's wheel ships jemalloc
(ray/core/libjemalloc.so), so it is on every machine that runs Flywheel; a
process gets it through LD_PRELOAD, which must be in its environment when it
starts (Ray's `runtime_env`). The path is the driver's: on a node where it does not exist the
dynamic loader says so and ignores it, and that rank runs the C library's allocator (the run's
summary lists each rank's, `learner_allocator`).

Measured on the ~80M model, bf16, one thread, Intel with AMX (a virtual machine,
where a first touch of a page costs the most): one optimiser step of a 64 x 76
token minibatch, ZeRO-2, took 2.4-3.0 s with glibc and 0.6 s with jemalloc;
forward, backward and step 10.0 s against 7.2 s (a one-off script). In a run
(`benchmarks/ppo_step.py`, with torch's fused AdamW) the update phase of a
1 x 1 x 384 PPO step fell from 4.10 to 2.02 s.

The learner keeps its peak memory mapped for its lifetime (it reaches that peak
at every step anyway). `auto` uses jemalloc on CPU runs and leaves GPU runs and
any LD_PRELOAD the user set alone; `system` never preloads. Standard library
only.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

ALLOCATORS = ("auto", "jemalloc", "system")  # the values learner.allocator accepts
# Keep freed pages (no decay to the kernel) and serve large allocations from the same arenas
# (jemalloc's separate arena for allocations above 8 MiB returns their pages at once).
JEMALLOC_CONF = "oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1"


def jemalloc_path() -> str | None:
    """The jemalloc library inside the installed Ray wheel, or None (found without importing Ray)."""
    spec = importlib.util.find_spec("ray")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / "core" / "libjemalloc.so"
        if path.is_file():
            return str(path)
    return None


def allocator_env(choice: str, device: str, preload: str = "") -> tuple[dict[str, str], str]:
    """(environment variables that start a learner process with `choice`'s allocator, why).

    `preload`: the LD_PRELOAD already in force (the driver's); `auto` leaves a set one alone,
    `jemalloc` puts jemalloc in front of it."""
    if choice not in ALLOCATORS:
        raise ValueError(f"learner.allocator must be one of {ALLOCATORS}, got {choice!r}")
    if choice == "system":
        return {}, "the system allocator (learner.allocator=system)"
    if choice == "auto" and device != "cpu":
        return {}, f"the system allocator (learner.allocator=auto on {device})"
    if choice == "auto" and preload.strip():
        return {}, f"the LD_PRELOAD already set ({preload.strip()})"
    path = jemalloc_path()
    if path is None:
        if choice == "jemalloc":
            raise FileNotFoundError(
                "learner.allocator=jemalloc: the installed Ray has no core/libjemalloc.so; "
                "set learner.allocator=auto or system")
        return {}, "the system allocator (this Ray ships no libjemalloc.so)"
    joined = " ".join(p for p in (path, preload.strip()) if p)
    return {"LD_PRELOAD": joined, "MALLOC_CONF": JEMALLOC_CONF}, f"jemalloc ({path}), keeping freed pages"


def process_allocator(maps_text: str | None = None) -> str:
    """"jemalloc" when this process has jemalloc mapped (/proc/self/maps), else "system"."""
    if maps_text is None:
        try:
            maps_text = Path("/proc/self/maps").read_text()
        except OSError:
            return "system"
    return "jemalloc" if any("jemalloc" in line.rsplit(" ", 1)[-1] for line in maps_text.splitlines()) else "system"
