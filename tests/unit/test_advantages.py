"""Unit tests of learner/advantages.py: hand-worked cases, masking, loop vs vectorised GAE."""


import pytest
import torch

from tests.helpers import GARBAGE, close, imported_modules

from learner import advantages as adv_module
from learner.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    compute_advantages,
    gae,
    gae_reference_loop,
    grpo,
    reinforce_pp,
    reinforce_pp_baseline,
    grpo_reference_loop,
    rloo_reference_loop,
    rloo,
    token_level_rewards,
)



def test_module_imports_only_torch_and_pure_modules():
    imported = imported_modules(adv_module.__file__)
    assert imported <= {"__future__", "typing", "dataclasses", "math", "torch", "learner.losses"}, imported


def test_token_level_rewards():
    # kl_coef 0.5. row 0 (3 tokens): -0.05, -0.1, -0.15 + score 1 = 0.85
    #              row 1 (1 token):  -0.25 + score 2 = 1.75, then padding 0
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, GARBAGE, float("inf")]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    rewards = token_level_rewards(torch.tensor([1.0, 2.0]), kl, mask, kl_coef=0.5)
    close(rewards, [[-0.05, -0.1, 0.85], [1.75, 0.0, 0.0]])


def test_token_level_rewards_rejects_empty_rows():
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        token_level_rewards(torch.ones(2), torch.zeros(2, 2), torch.tensor([[1, 0], [0, 0]]), 0.1)


# ---------------------------------------------------------------- GAE


def test_gae_by_hand():
    # gamma 0.9, lam 0.8, rewards (0, 1), values (0.5, 0.8), terminal after token 1:
    #   delta_1 = 1 + 0.9 * 0 - 0.8 = 0.2                A_1 = 0.2
    #   delta_0 = 0 + 0.9 * 0.8 - 0.5 = 0.22             A_0 = 0.22 + 0.9 * 0.8 * 0.2 = 0.364
    #   returns = A + V = (0.864, 1.0)
    # The padded third column holds garbage: reading its value as V(s_2) would change A_1.
    rewards = torch.tensor([[0.0, 1.0, GARBAGE]])
    values = torch.tensor([[0.5, 0.8, GARBAGE]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    for fn in (gae, gae_reference_loop):
        advantages, returns = fn(rewards, values, mask, gamma=0.9, lam=0.8)
        close(advantages, [[0.364, 0.2, 0.0]])
        close(returns, [[0.864, 1.0, 0.0]])


def test_gae_with_lambda_one_gives_monte_carlo_returns():
    # gamma = lam = 1: returns are the plain sums of future rewards, whatever the values.
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, GARBAGE, GARBAGE]])
    values = torch.tensor([[7.0, -3.0, 0.5], [2.0, GARBAGE, GARBAGE]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(returns, [[6.0, 5.0, 3.0], [4.0, 0.0, 0.0]])
    close(advantages, [[-1.0, 8.0, 2.5], [2.0, 0.0, 0.0]])


def test_gae_vectorised_matches_reference_loop_on_ragged_batches():
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        B, T = 6, 9
        lengths = torch.randint(1, T + 1, (B,), generator=gen)
        mask = torch.arange(T)[None, :] < lengths[:, None]
        rewards = torch.where(mask, torch.randn(B, T, generator=gen), GARBAGE)
        values = torch.where(mask, torch.randn(B, T, generator=gen), -GARBAGE)
        gamma, lam = torch.rand(2, generator=gen).tolist()
        fast = gae(rewards, values, mask, gamma, lam)
        slow = gae_reference_loop(rewards, values, mask, gamma, lam)
        torch.testing.assert_close(fast.advantages, slow.advantages, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast.returns, slow.returns, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- critic-free

# Rows answer prompts 7, 3, 7, 3, 5 (ids need not be contiguous or sorted).
# Sequence rewards (sum of token rewards): 1, 5, 3, 5, 4.
GROUPS = torch.tensor([7, 3, 7, 3, 5])
TOKEN_REWARDS = torch.tensor(
    [
        [0.5, 0.5, GARBAGE],
        [5.0, GARBAGE, GARBAGE],
        [1.0, 1.0, 1.0],
        [2.0, 3.0, GARBAGE],
        [4.0, GARBAGE, GARBAGE],
    ]
)
MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0]])
MASKF = MASK.float()


def test_grpo_by_hand():
    # group 7: rewards 1, 3: mean 2, unbiased std sqrt((1 + 1) / 1) = 1.41421 -> -0.70711, +0.70711
    # group 3: rewards 5, 5: identical, advantage exactly 0 (not nan)
    # group 5: alone, no baseline: its raw reward 4
    advantages, returns = grpo(TOKEN_REWARDS, MASK, GROUPS)
    per_row = torch.tensor([-0.70711, 0.0, 0.70711, 0.0, 4.0])
    close(advantages, per_row[:, None] * MASKF)
    # returns: undiscounted return-to-go of the token rewards
    close(returns, [[1.0, 0.5, 0.0], [5.0, 0.0, 0.0], [3.0, 2.0, 1.0], [5.0, 3.0, 0.0], [4.0, 0.0, 0.0]])


def test_grpo_identical_rewards_give_zero_advantage():
    advantages, _ = grpo(torch.full((4, 2), 0.7), torch.ones(4, 2), torch.zeros(4, dtype=torch.long))
    assert torch.equal(advantages, torch.zeros(4, 2))


def test_rloo_by_hand():
    # rewards 1, 2, 3 in one group: baselines (2 + 3) / 2 = 2.5, (1 + 3) / 2 = 2, (1 + 2) / 2 = 1.5
    # advantages -1.5, 0, +1.5
    rewards = torch.tensor([[1.0, GARBAGE], [2.0, GARBAGE], [3.0, GARBAGE]])
    mask = torch.tensor([[1, 0]] * 3)
    advantages, _ = rloo(rewards, mask, torch.tensor([0, 0, 0]))
    close(advantages, [[-1.5, 0.0], [0.0, 0.0], [1.5, 0.0]])
    # mixed groups: group 7 (1, 3): -2, +2; group 3 (5, 5): 0, 0; group 5 alone: raw 4
    advantages, _ = rloo(TOKEN_REWARDS, MASK, GROUPS)
    close(advantages, torch.tensor([-2.0, 0.0, 2.0, 0.0, 4.0])[:, None] * MASKF)


def test_reinforce_pp_by_hand():
    # gamma 1: row 0 rewards (0, 1) -> returns (1, 1); row 1 reward (2) -> return 2
    # whitened over the 3 real tokens: mean 4/3, population var ((1/3)^2 * 2 + (2/3)^2) / 3 = 2/9,
    # std 0.47140 -> (-1/3) / 0.4714 = -0.70711 twice, (2/3) / 0.4714 = 1.41421
    rewards = torch.tensor([[0.0, 1.0], [2.0, GARBAGE]])
    mask = torch.tensor([[1, 1], [1, 0]])
    advantages, returns = reinforce_pp(rewards, mask, gamma=1.0)
    close(returns, [[1.0, 1.0], [2.0, 0.0]])
    close(advantages, [[-0.70711, -0.70711], [1.41421, 0.0]])
    # gamma 0.5: row 0 returns (0 + 0.5 * 1, 1) = (0.5, 1)
    _, returns = reinforce_pp(rewards, mask, gamma=0.5)
    close(returns, [[0.5, 1.0], [2.0, 0.0]])


def test_reinforce_pp_baseline_by_hand():
    # Two prompts, two samples each, one token per sample, gamma 1.
    # group 0: rewards 1, 3 -> mean 2 -> shifted -1, +1; group 1: rewards 5, 5 -> 0, 0.
    # Whitened over the 4 tokens: mean 0, population std sqrt(2 / 4) = 0.70711
    # -> -1.41421, +1.41421, 0, 0. Returns are the shifted rewards before whitening.
    rewards = torch.tensor([[1.0], [3.0], [5.0], [5.0]])
    advantages, returns = reinforce_pp_baseline(rewards, torch.ones(4, 1), torch.tensor([0, 0, 1, 1]))
    close(returns, [[-1.0], [1.0], [0.0], [0.0]])
    close(advantages, [[-1.41421], [1.41421], [0.0], [0.0]])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_and_rloo_vectorised_match_plain_loops(seed):
    gen = torch.Generator().manual_seed(seed)
    b, t = 24, 7
    rewards = torch.randn(b, t, generator=gen)
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()
    rewards = torch.where(mask.bool(), rewards, GARBAGE)
    groups = torch.randint(0, 7, (b,), generator=gen) * 10  # ragged groups, some of one, ids not 0..G-1
    got, _ = grpo(rewards, mask, groups)
    close(got[:, 0], grpo_reference_loop(rewards, mask, groups), atol=1e-4)
    got, _ = rloo(rewards, mask, groups)
    close(got[:, 0], rloo_reference_loop(rewards, mask, groups), atol=1e-4)


# ---------------------------------------------------------------- registry


def test_registry_dispatches_to_the_named_function():
    assert set(ADVANTAGE_ESTIMATORS) == {"gae", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"}
    inputs = AdvantageInputs(
        token_rewards=TOKEN_REWARDS,
        mask=MASK,
        values=torch.where(MASK.bool(), 0.25, GARBAGE),
        group_index=GROUPS,
        gamma=0.9,
        lam=0.8,
    )
    expected = {
        "gae": gae(TOKEN_REWARDS, inputs.values, MASK, 0.9, 0.8),
        "grpo": grpo(TOKEN_REWARDS, MASK, GROUPS),
        "rloo": rloo(TOKEN_REWARDS, MASK, GROUPS),
        "reinforce_pp": reinforce_pp(TOKEN_REWARDS, MASK, 0.9),
    }
    for name, (advantages, returns) in expected.items():
        got = compute_advantages(name, inputs)
        torch.testing.assert_close(got.advantages, advantages)
        torch.testing.assert_close(got.returns, returns)


def test_registry_errors_say_what_is_valid_or_missing():
    inputs = AdvantageInputs(token_rewards=TOKEN_REWARDS, mask=MASK)
    with pytest.raises(ValueError, match=r"'gae', 'grpo', 'reinforce_pp', 'reinforce_pp_baseline', 'rloo'"):
        compute_advantages("ppo", inputs)
    with pytest.raises(ValueError, match=r"'gae' needs AdvantageInputs\.values"):
        compute_advantages("gae", inputs)
    with pytest.raises(ValueError, match=r"'rloo' needs AdvantageInputs\.group_index"):
        compute_advantages("rloo", inputs)
    compute_advantages("reinforce_pp", inputs)  # needs neither
