"""What every learner rank does the same way, whatever it trains: join the
DeepSpeed group, wrap a model in a DeepSpeed engine, stream its full weights
(gathered under ZeRO-3), save it in Hugging Face format, and free the group's
shared memory. Used by the PPO learner (`learner/worker.py`) and the SFT,
reward-model and DPO stages (`learner/stages.py`).
"""

from __future__ import annotations

import glob
import math
import os
import shutil
import sys
import sysconfig
import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Iterator

import torch

from flywheel.records import SamplingSettings
from learner.models import DTYPES


@dataclass
class LearnerSetup:
    """What one rank needs to start; built by cluster/ from the run config."""

    model_path: str
    rank: int
    world_size: int
    master_addr: str
    master_port: int
    device: str  # "cpu" or "cuda"
    dtype: str  # "bfloat16" or "float32", already resolved for the hardware
    zero_stage: int
    seed: int
    dist_timeout_s: float
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    ref_model_path: str | None = None  # the frozen KL / DPO reference; None: the starting policy
    group_size: int = 1  # samples per prompt: rows i*g .. i*g+g-1 of a step answer one prompt


# A build of DeepSpeed's shared-memory op takes well under a minute on 2 cores; a lock older
# than this was left by a build whose process was stopped.
BUILD_LOCK_STALE_S = 600.0


def prepare_op_builds(stale_after_s: float = BUILD_LOCK_STALE_S, poll_s: float = 2.0) -> str:
    """Give DeepSpeed's just-in-time C++ builds a folder of this Python environment's own, and
    clear build locks that a stopped build left behind; the folder.

    On the CPU, joining a group builds DeepSpeed's shared-memory allreduce op. torch guards the
    build with a lock file and waits on it with no time limit, so a build killed half-way (a
    test timeout, a stopped job) would hang every later start on the machine. A lock younger
    than `stale_after_s` may belong to a build in progress and is waited for; an older one is
    removed with a warning. One folder per environment also keeps two checkouts from rebuilding
    each other's copy.

    The build runs the first `ninja` on PATH, and the ninja of PyPI (in this environment's
    scripts folder) and a system one (Debian's 1.11) hash a command differently: each takes the
    other's build for one made with another command and rebuilds it, some 30 s on 2 cores. A
    run started with this environment's scripts folder on PATH (`ray job submit` from an
    activated environment) and one started without it would rebuild the op for each other. So
    the ninja of this environment, when it has one, comes first.
    """
    _put_first_on_path(sysconfig.get_path("scripts"), "ninja")
    default = os.path.join(sys.prefix, "torch_extensions")
    if "TORCH_EXTENSIONS_DIR" not in os.environ and os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = default
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.expanduser("~/.cache/torch_extensions")
    for lock in glob.glob(os.path.join(root, "**", "lock"), recursive=True):
        _wait_or_clear(lock, stale_after_s, poll_s)
    return root


def _put_first_on_path(folder: str, program: str) -> None:
    """Make `folder`'s copy of `program`, if it has one, the one found first on PATH."""
    found = shutil.which(program)
    if os.path.isfile(os.path.join(folder, program)) and not (found and os.path.dirname(found) == folder):
        os.environ["PATH"] = os.pathsep.join([folder, os.environ.get("PATH", "")])


def _wait_or_clear(lock: str, stale_after_s: float, poll_s: float) -> None:
    announced = False
    while True:
        try:
            age = time.time() - os.path.getmtime(lock)
        except FileNotFoundError:
            return  # the build in progress finished
        if age >= stale_after_s:
            try:
                os.remove(lock)
            except FileNotFoundError:
                return
            warnings.warn(f"removed {lock}: a C++ op build left it {age:.0f} s ago and never finished "
                          f"(its process was stopped); the op is rebuilt now", stacklevel=3)
            return
        if not announced:
            print(f"waiting for another process's C++ op build to finish ({lock}, at most "
                  f"{stale_after_s - age:.0f} s more)", file=sys.stderr, flush=True)
            announced = True
        time.sleep(poll_s)


def build_ops() -> None:
    """Build, ahead of the first run, the C++ ops that joining a group would build (set-up calls this)."""
    prepare_op_builds()
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        builder.load(verbose=False)
        print(f"flywheel: built {builder.NAME} in {os.environ.get('TORCH_EXTENSIONS_DIR')}")


def join_group(setup: LearnerSetup) -> torch.device:
    """Seed, set threads, join the DeepSpeed group (gloo on CPU, NCCL on GPU); the rank's device."""
    torch.manual_seed(setup.seed + setup.rank)
    prepare_op_builds()
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        # Ray's worker may have started torch with its own thread count.
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    os.environ.update(
        RANK=str(setup.rank),
        WORLD_SIZE=str(setup.world_size),
        LOCAL_RANK="0" if setup.device == "cpu" else os.environ.get("LOCAL_RANK", "0"),
        MASTER_ADDR=setup.master_addr,
        MASTER_PORT=str(setup.master_port),
    )
    import deepspeed

    deepspeed.init_distributed(
        dist_backend="nccl" if setup.device == "cuda" else "gloo",
        timeout=timedelta(seconds=setup.dist_timeout_s),
        verbose=False,
    )
    return torch.device("cuda", torch.cuda.current_device()) if setup.device == "cuda" else torch.device("cpu")


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate over a known number of optimiser steps, as a factor of the peak rate:
    a linear warm-up over `warmup_steps`, then constant, or a linear or cosine decay to zero at
    `total_steps`."""

    kind: str = "constant"  # constant | linear | cosine
    warmup_steps: int = 0
    total_steps: int = 1

    KINDS = ("constant", "linear", "cosine")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise ValueError(f"lr schedule must be one of {self.KINDS}, got {self.kind!r}")

    def factor(self, step: int) -> float:
        """The multiplier of the peak rate for optimiser step `step` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        done = min(1.0, (step - self.warmup_steps) / span)
        return 1.0 - done if self.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))


def zero_settings(model: torch.nn.Module, stage: int) -> dict:
    """DeepSpeed's `zero_optimization` section for `model` at `stage`.

    At ZeRO-3 the buffers that every rank holds whole, whatever the number of ranks, are sized
    by the model's hidden width h instead of DeepSpeed's defaults (which fit models of billions
    of parameters): gradients are reduced in buckets of h*h elements, not 5e8 (a bucket that
    large keeps the whole model's gradients resident on each rank, once per engine), and only
    weights under 10*h elements (norms, biases, the value head) stay whole on every rank: the
    values Hugging Face's DeepSpeed integration derives for its "auto" settings. DeepSpeed's
    layer prefetch and reuse limits stay at their defaults: lowered to the same scale, they
    left a parameter in flight when a pass in another order (generation, evaluation) began,
    and DeepSpeed refused to partition it.
    On the ~80M model in bfloat16 (benchmarks/memory.py, one run each, Intel with AMX) this
    took a single rank's peak from 5.56 to 5.00 GiB and each of two ranks' from 3.79 to 3.46."""
    if stage != 3:
        return {"stage": stage}
    hidden = next((m.config.hidden_size for m in model.modules()
                   if hasattr(getattr(m, "config", None), "hidden_size")), None)
    if hidden is None:
        return {"stage": 3}
    return {"stage": 3, "reduce_bucket_size": hidden * hidden,
            "stage3_param_persistence_threshold": 10 * hidden}


def make_engine(model: torch.nn.Module, setup: LearnerSetup, lr: float, weight_decay: float, micro_batch: int,
                max_grad_norm: float, schedule: LRSchedule | None = None,
                lr_by_prefix: dict[str, float] | None = None):
    """A DeepSpeed engine around `model` (fp32 master weights; bf16 compute when the run's dtype is bf16).

    With a `schedule`, every `engine.step()` also moves the learning rate along it.
    `lr_by_prefix`: parameters whose names start with a key train at its rate instead of `lr`."""
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero_settings(model, setup.zero_stage),
        "bf16": {"enabled": setup.dtype == "bfloat16"},
        # torch's AdamW: DeepSpeed's fused CPU Adam would need a C++ build at start.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        rate = next((r for p, r in (lr_by_prefix or {}).items() if name.startswith(p)), lr)
        groups.setdefault(rate, []).append(param)
    # torch's fused AdamW (one kernel per parameter group) rather than its default loop of
    # elementwise ops: on the ~80M model, one thread, a ZeRO-2 step took 0.41 s against 0.61 s
    # (README, the learner's allocator and optimiser). It runs on CPU and CUDA alike.
    optimizer = torch.optim.AdamW([{"params": ps, "lr": r} for r, ps in groups.items()], lr=lr,
                                  weight_decay=weight_decay, fused=True)
    scheduler = None
    if schedule is not None and (schedule.kind != "constant" or schedule.warmup_steps):
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, lr_scheduler=scheduler)
    return engine


def make_frozen(model: torch.nn.Module, setup: LearnerSetup, device: torch.device, micro_batch: int) -> torch.nn.Module:
    """A frozen model (the KL reference) for forward passes only.

    Under ZeRO-3 its weights are partitioned over the ranks like the policy's, so a rank holds
    about 1/world_size of them: DeepSpeed's ZeRO-3 engine without an optimiser gathers each
    layer's weights for its forward and frees them after (as DeepSpeed-Chat and OpenRLHF wrap
    their reference models). At the other stages the model stays whole on every rank. Every
    rank must then call its forward the same number of times, as it does the policy's."""
    model = model.to(device).eval().requires_grad_(False)
    if setup.zero_stage != 3:
        return model
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "zero_optimization": zero_settings(model, 3),
        "bf16": {"enabled": setup.dtype == "bfloat16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def held_elements(model: torch.nn.Module) -> tuple[int, int]:
    """(weight elements this rank holds, elements of the whole model): under ZeRO-3 a rank holds
    its partition of each weight (`ds_tensor`), plus whole the weights too small to partition."""
    held = total = 0
    for p in model.parameters():
        full = getattr(p, "ds_numel", p.numel())
        held += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
        total += full
    return held, total


def rng_states() -> dict:
    """This process's torch (and CUDA), numpy and python RNG states, for a checkpoint."""
    import random

    import numpy as np

    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# DeepSpeed files each engine's checkpoint under a tag folder; one checkpoint folder holds one tag.
ENGINE_TAG = "engine"


def save_engine(engine, folder: str) -> None:
    """Weights and optimiser states of a DeepSpeed engine (every rank writes its ZeRO partition; collective)."""
    engine.save_checkpoint(folder, tag=ENGINE_TAG, save_latest=False)


def load_engine(engine, folder: str) -> None:
    """The inverse of save_engine, into a freshly built engine (ZeRO-3 cannot load into a used one)."""
    path, _ = engine.load_checkpoint(folder, tag=ENGINE_TAG, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint tagged {ENGINE_TAG!r} in {folder}")


def pad_token_id(path: str) -> int:
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is not None:
        return int(tok.pad_token_id)
    eos = AutoConfig.from_pretrained(path).eos_token_id
    return int(eos[0] if isinstance(eos, list) else eos or 0)


def full_parameters(module: torch.nn.Module, dtype: str, skip=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor in `dtype`) for every parameter of a DeepSpeed engine's module, but those
    whose name `skip(name)` is true; all ranks must iterate.

    Tensors stay on the module's device (a GPU run sends GPU to GPU). Under
    ZeRO-3 each parameter is gathered for the duration of one item, so it is
    copied before the gather releases it.
    """
    import deepspeed

    torch_dtype = DTYPES[dtype]
    for name, param in module.named_parameters():
        if skip is not None and skip(name):
            continue
        if hasattr(param, "ds_id"):
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                yield name, param.data.detach().to(dtype=torch_dtype, copy=True)
        else:
            yield name, param.data.detach().to(dtype=torch_dtype)


def save_hf(module: torch.nn.Module, rank: int, dtype: str, tokenizer_path: str, out_dir: str,
            skip=None) -> str | None:
    """Write the module in Hugging Face format with its tokenizer (rank 0 writes; all ranks gather),
    without the parameters `skip(name)` names."""
    state = {name: tensor.cpu() for name, tensor in full_parameters(module, dtype, skip)}
    if rank != 0:
        return None
    from transformers import AutoTokenizer

    module.config.torch_dtype = DTYPES[dtype]
    module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(out_dir)
    return out_dir


def shm_prefix(master_addr: str, master_port: int) -> str:
    """Path prefix of DeepSpeed's shared-memory allreduce buffers of one group.

    DeepSpeed's CPU op names them `deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank}`
    and never removes them; the port makes the name unique to one run.
    """
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{master_addr}_{master_port}_"


def remove_shm(master_addr: str, master_port: int, rank: int | None = None) -> list[str]:
    """Remove one group's shared-memory buffers (one rank's, or all when rank is None)."""
    prefix = shm_prefix(master_addr, master_port)
    paths = [prefix + str(rank)] if rank is not None else glob.glob(glob.escape(prefix) + "*")
    removed = []
    for path in paths:
        try:
            os.remove(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def leave_group(setup: LearnerSetup, destroy_process_group: bool = True) -> list[str]:
    """Leave the DeepSpeed group and remove this rank's shared memory; returns the files removed.

    In-process tests keep the group: DeepSpeed caches its sub-groups globally
    and cannot re-create them in one process.
    """
    if destroy_process_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return remove_shm(setup.master_addr, setup.master_port, setup.rank)
