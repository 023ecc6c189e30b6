"""Config loading: every shipped YAML loads; bad keys and values fail naming the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import ConfigError, advisories, describe, from_dict, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_carry_a_header(path):
    cfg = load_config(path)
    assert cfg.run.steps >= 1
    assert path.read_text().startswith("#"), "every config opens with a header saying what it runs"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["rollout.num_actors=0"], "rollout.num_actors: must be >= 1, got 0"),
        (["rollout.num_engines=2"], "rollout.num_engines: unknown key; valid keys here are"),
        (["bogus.x=1"], "bogus: unknown key"),
        (["learner.kl_mode=both"], "learner.kl_mode: must be one of 'reward', 'loss', got 'both'"),
        (["run.steps=ten"], "run.steps: must be an integer, got 'ten'"),
        (["rollout.top_p=1.5"], "rollout.top_p: must be <= 1, got 1.5"),
        (["rollout.temperature=0"], "rollout.temperature: must be > 0, got 0.0"),
        (["rollout.max_new_tokens=300"], "rollout.max_new_tokens: must be < model.max_model_len (256)"),
        (["learner.minibatch_size=48"], "learner.minibatch_size: must divide the sequences per step"),
        (["reward.rule=null"], "reward: set exactly one of reward.rule and reward.model_path"),
        (["sync.backend=nccl"], "sync.backend: nccl needs run.device=cuda"),
        (["learner.kl_mode=loss"], "learner.kl_estimator: k1 with learner.kl_mode=loss has zero expected gradient"),
        (["model.dtype=float16"], "model.dtype: must be one of 'auto', 'bfloat16', 'float32', got 'float16'"),
        (["rollout.top_k=-1"], "rollout.top_k: must be >= 0, got -1"),
        (["learner.advantage=grpo", "rollout.samples_per_prompt=1"],
         "learner.advantage: grpo compares samples of the same prompt, so it needs rollout.samples_per_prompt >= 2"),
        (["learner.advantage=rloo", "rollout.samples_per_prompt=2", "learner.critic_warmup_steps=3"],
         "learner.critic_warmup_steps: rloo trains no critic"),
        (["learner.critic_trunk=shared", "learner.critic_warmup_steps=2"],
         "learner.critic_warmup_steps: with learner.critic_trunk=shared"),
        (["rollout.block_size=48"], "rollout.block_size: vLLM's CPU attention needs a multiple of 32"),
        (["learner.advantage=ppo"], "learner.advantage: must be one of 'gae', 'grpo', 'rloo'"),
        (["run.steps"], "expected key=value"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        from_dict({}, overrides)
    assert message in str(info.value)


def test_kl_in_the_loss_takes_k2_and_k3_is_flagged():
    assert from_dict({}, ["learner.kl_mode=loss", "learner.kl_estimator=k2"]).learner.kl_estimator == "k2"
    assert advisories(from_dict({}, ["learner.kl_mode=loss", "learner.kl_estimator=k2"])) == []
    [note] = advisories(from_dict({}, ["learner.kl_mode=loss", "learner.kl_estimator=k3"]))
    assert "KL(reference || policy)" in note


def test_defaults_choose_dtype_from_hardware_and_any_actor_count():
    cfg = from_dict({})
    assert cfg.model.dtype == "auto"
    # 10 prompts over 3 actors: split 3/4/3 (balanced) rather than rejected or cut.
    assert from_dict({}, ["data.prompts_per_step=10", "rollout.num_actors=3", "learner.minibatch_size=10"])


def test_overrides_and_yaml_floats():
    cfg = from_dict({"learner": {"lr": "1e-4"}}, ["learner.critic_lr=5e-5", "run.steps=7", "model.path=/tmp/m"])
    assert cfg.learner.lr == 1e-4 and cfg.learner.critic_lr == 5e-5  # "5e-5" is a string to YAML 1.1
    assert cfg.run.steps == 7 and cfg.model.path == "/tmp/m"
    assert cfg.sync_backend == "gloo"
    assert from_dict({}, ["run.device=cuda"]).sync_backend == "nccl"
    with pytest.raises(ConfigError, match="sync.transport: shm carries CPU tensors over gloo"):
        from_dict({}, ["run.device=cuda", "sync.transport=shm"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("run: 3\n")
    with pytest.raises(ConfigError, match="run: must be a mapping"):
        load_config(bad)


def test_every_field_is_documented():
    lines = describe()
    assert len(lines) > 40
    assert all("#" in line and line.split("#", 1)[1].strip() for line in lines)


def test_every_advantage_name_in_the_config_is_registered():
    import typing

    from learner.advantages import ADVANTAGE_ESTIMATORS
    from learner.config import NEEDS_CRITIC, NEEDS_GROUPS, SELF_NORMALISING, LearnerConfig

    names = set(typing.get_args(typing.get_type_hints(LearnerConfig)["advantage"]))
    assert names == set(ADVANTAGE_ESTIMATORS)
    assert (NEEDS_CRITIC | NEEDS_GROUPS | SELF_NORMALISING) <= names


def test_pipeline_stages_chain_their_outputs():
    from cluster.pipeline import stage_config

    cfg = from_dict({"run": {"stages": ["sft", "reward_model", "ppo"], "output_dir": "out"}})
    sft = stage_config(cfg, "sft", {})
    assert (sft.run.stage, sft.run.output_dir, sft.model.path, sft.run.stages) == ("sft", "out/sft", None, [])
    rm = stage_config(cfg, "reward_model", {"sft": "/m/sft"})
    assert rm.model.path == "/m/sft"  # the judge starts from the fine-tuned policy
    ppo = stage_config(cfg, "ppo", {"sft": "/m/sft", "reward_model": "/m/rm"})
    assert (ppo.model.path, ppo.reward.rule, ppo.reward.model_path) == ("/m/sft", None, "/m/rm")
    assert cfg.run.stages == ["sft", "reward_model", "ppo"]  # the pipeline's own config is untouched


@pytest.mark.parametrize("value, message", [
    ("[sft, sft]", "run.stages: each stage may appear once"),
    ("[sft, rlhf]", "run.stages[1]: must be one of 'sft', 'reward_model', 'dpo', 'ppo', got 'rlhf'"),
    ("sft", "run.stages: must be a list, got 'sft'"),
])
def test_bad_pipelines_name_the_problem(value, message):
    with pytest.raises(ConfigError) as info:
        from_dict({}, [f"run.stages={value}"])
    assert message in str(info.value)
