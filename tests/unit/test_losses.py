"""Unit tests of learner/losses.py: small cases worked by hand, masking, gradients."""

import math

import pytest
import torch

from tests.helpers import GARBAGE, close, imported_modules

from learner import losses
from learner.losses import (
    KL_ESTIMATORS,
    behavior_weights,
    bradley_terry_loss,
    dpo_loss,
    entropy_from_logits,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_whiten,
    policy_loss_clipped,
    value_loss_clipped,
)



def test_module_imports_only_torch_and_stdlib():
    # Importing learner.losses must cost nothing beyond torch: no ray, vllm, deepspeed, numpy.
    imported = imported_modules(losses.__file__, top_level=True)
    assert imported <= {"__future__", "typing", "dataclasses", "math", "torch"}, imported


# ---------------------------------------------------------------- masked reductions

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, GARBAGE, float("inf")]])
M = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


def test_masked_sum_and_mean_ignore_padding():
    # real entries 1, 2, 3 | 4: sum 10, mean 10 / 4 = 2.5; per row sums 6 | 4, means 2 | 4
    close(masked_sum(X, M), 10.0)
    close(masked_mean(X, M), 2.5)
    close(masked_sum(X, M, dim=-1), [6.0, 4.0])
    close(masked_mean(X, M, dim=-1), [2.0, 4.0])
    close(masked_mean(X, M.bool()), 2.5)  # bool masks work the same


def test_masked_mean_of_empty_mask_is_zero_not_nan():
    close(masked_mean(X, torch.zeros_like(M)), 0.0)
    close(masked_mean(X, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]), dim=-1), [1.5, 0.0])


def test_masked_whiten():
    # real entries 2, 6: mean 4, population var ((-2)^2 + 2^2) / 2 = 4, std 2 -> -1, 1
    x = torch.tensor([[2.0, GARBAGE], [6.0, -GARBAGE]])
    m = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    close(masked_whiten(x, m), [[-1.0, 0.0], [1.0, 0.0]])
    # shift_mean=False adds the mean 4 back: 3, 5
    close(masked_whiten(x, m, shift_mean=False), [[3.0, 0.0], [5.0, 0.0]])


# ---------------------------------------------------------------- KL estimators


def test_kl_estimators_by_hand():
    # d = logp - ref = 0.5:  k1 = 0.5;  k2 = 0.5 * 0.25 = 0.125;
    # k3 = e^-0.5 - (-0.5) - 1 = 0.60653 + 0.5 - 1 = 0.10653
    logp, ref = torch.tensor([[-1.0]]), torch.tensor([[-1.5]])
    close(kl_penalty(logp, ref, "k1"), [[0.5]])
    close(kl_penalty(logp, ref, "k2"), [[0.125]])
    close(kl_penalty(logp, ref, "k3"), [[0.10653]])
    # d = -0.5: k1 = -0.5 (k1 can go negative), k3 = e^0.5 - 0.5 - 1 = 0.14872
    close(kl_penalty(ref, logp, "k1"), [[-0.5]])
    close(kl_penalty(ref, logp, "k3"), [[0.14872]])
    for name in KL_ESTIMATORS:  # identical policies: every estimator is 0
        close(kl_penalty(logp, logp, name), [[0.0]])


def test_k1_and_k3_are_unbiased_estimates_of_kl_policy_to_ref():
    # Sample tokens from the policy q; the mean of k1 and k3 must approach the
    # exact KL(q || p) = sum q log(q / p). A swapped argument order would not.
    q = torch.tensor([0.7, 0.2, 0.1])
    p = torch.tensor([0.2, 0.3, 0.5])
    exact = float((q * (q / p).log()).sum())  # 0.5745
    gen = torch.Generator().manual_seed(0)
    tokens = torch.multinomial(q, 200_000, replacement=True, generator=gen)
    logp, ref = q.log()[tokens], p.log()[tokens]
    close(kl_penalty(logp, ref, "k1").mean(), exact, atol=0.01)
    close(kl_penalty(logp, ref, "k3").mean(), exact, atol=0.01)


def test_unknown_kl_estimator_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"'k1', 'k2', 'k3'"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


# ---------------------------------------------------------------- PPO policy loss

# Four real tokens, one per row, then a padded column full of garbage (even inf and nan).
#   row 0: log-ratio +0.5, r = e^0.5 = 1.64872, A = +2: -min(3.29744, 1.2 * 2 = 2.4) = -2.4        clipped
#   row 1: log-ratio +0.5, r = 1.64872,          A = -2: -min(-3.29744, -2.4) = +3.29744            unclipped
#   row 2: log-ratio -0.5, r = e^-0.5 = 0.60653, A = +2: -min(1.21306, 0.8 * 2 = 1.6) = -1.21306    unclipped
#   row 3: log-ratio -0.5, r = 0.60653,          A = -2: -min(-1.21306, -1.6) = +1.6                clipped
# loss = (-2.4 + 3.29744 - 1.21306 + 1.6) / 4 = 0.32110; clipfrac = 2 / 4 = 0.5
# approx_kl = k3 of KL(old || new) = mean of (r - 1 - log r):
#   (2 * (1.64872 - 1.5) + 2 * (0.60653 - 0.5)) / 4 = (0.29744 + 0.21306) / 4 = 0.12763
OLD = torch.tensor([[-1.0, -GARBAGE], [-1.0, GARBAGE], [-1.0, -GARBAGE], [-1.0, GARBAGE]])
NEW = torch.tensor([[-0.5, GARBAGE], [-0.5, -GARBAGE], [-1.5, GARBAGE], [-1.5, 0.0]])
ADV = torch.tensor([[2.0, GARBAGE], [-2.0, GARBAGE], [2.0, -float("inf")], [-2.0, float("nan")]])
PAD_MASK = torch.tensor([[1.0, 0.0]] * 4)


def test_policy_loss_by_hand():
    out = policy_loss_clipped(NEW, OLD, ADV, PAD_MASK, clip_eps=0.2)
    close(out.loss, 0.32110)
    close(out.clipfrac, 0.5)
    close(out.approx_kl, 0.12763)


def test_policy_loss_gradient_is_zero_where_clipped_and_finite_on_padding():
    logprobs = NEW.clone().requires_grad_(True)
    policy_loss_clipped(logprobs, OLD, ADV, PAD_MASK, clip_eps=0.2).loss.backward()
    # d/dlogp of -A r / 4 is -A r / 4: row 1: 2 * 1.64872 / 4 = 0.82436; row 2: -2 * 0.60653 / 4 = -0.30327
    close(logprobs.grad[:, 0], [0.0, 0.82436, -0.30327, 0.0])
    close(logprobs.grad[:, 1], [0.0, 0.0, 0.0, 0.0])  # exp(1e9) on padding must not leak nan


def test_policy_loss_clip_higher():
    # eps = 0.2, eps_high = 0.28: row 0 is now clipped at 1.28 -> -2.56; row 3 still at 0.8 -> +1.6
    # loss = (-2.56 + 3.29744 - 1.21306 + 1.6) / 4 = 0.28110
    out = policy_loss_clipped(NEW, OLD, ADV, PAD_MASK, clip_eps=0.2, clip_eps_high=0.28)
    close(out.loss, 0.28110)


def test_approx_kl_is_k3_of_old_to_new():
    # one token, log-ratio new - old = +0.5: k3 of KL(old || new) = e^0.5 - 1 - 0.5 = 0.14872
    # (the reverse direction would give e^-0.5 - 1 + 0.5 = 0.10653)
    one = torch.ones(1, 1)
    out = policy_loss_clipped(torch.tensor([[-0.5]]), torch.tensor([[-1.0]]), one, one, clip_eps=0.2)
    close(out.approx_kl, 0.14872)


def test_behavior_weights_by_hand():
    # proximal - behaviour log-ratios per row: +0.5 -> e^0.5 = 1.64872; -1.0 -> e^-1 = 0.36788;
    # +2.0 -> e^2 = 7.389, truncated at the cap 2.0; 0 -> 1. Padding (garbage) gets 0.
    prox = torch.tensor([[-0.5, GARBAGE], [-2.0, -GARBAGE], [0.0, 0.0], [-1.0, float("nan")]])
    behav = torch.tensor([[-1.0, -GARBAGE], [-1.0, GARBAGE], [-2.0, 5.0], [-1.0, 0.0]])
    w = behavior_weights(prox, behav, PAD_MASK, cap=2.0)
    close(w[:, 0], [1.64872, 0.36788, 2.0, 1.0])
    close(w[:, 1], [0.0, 0.0, 0.0, 0.0])
    assert not w.requires_grad


def test_weighted_policy_loss_by_hand():
    # The per-token terms of test_policy_loss_by_hand, -2.4, +3.29744, -1.21306, +1.6, weighted
    # by 0.5, 2, 1, 0: (-1.2 + 6.59488 - 1.21306 + 0) / 4 = 1.04546. Weights of 1 give the plain loss.
    w = torch.tensor([[0.5, 9.0], [2.0, 9.0], [1.0, 9.0], [0.0, 9.0]])
    close(policy_loss_clipped(NEW, OLD, ADV, PAD_MASK, clip_eps=0.2, weights=w).loss, 1.04546)
    ones = torch.ones(4, 2)
    close(policy_loss_clipped(NEW, OLD, ADV, PAD_MASK, clip_eps=0.2, weights=ones).loss, 0.32110)


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    adv = torch.tensor([[1.0, 3.0, GARBAGE]])
    out = policy_loss_clipped(torch.zeros(1, 3), torch.zeros(1, 3), adv, torch.tensor([[1, 1, 0]]), 0.2)
    close(out.loss, -2.0)
    close(out.clipfrac, 0.0)
    close(out.approx_kl, 0.0)


# ---------------------------------------------------------------- value loss


def test_value_loss_by_hand():
    # token 0: v = 1.5, old 1.0, R = 2.0, eps 0.2: unclipped (1.5 - 2)^2 = 0.25;
    #          clipped v = 1.0 + 0.2 = 1.2, (1.2 - 2)^2 = 0.64; max 0.64, half 0.32   (clipped)
    # token 1: v = 1.1 within 0.2 of old 1.0: both (1.1 - 2)^2 = 0.81, half 0.405
    # loss = (0.32 + 0.405) / 2 = 0.3625, clipfrac 1 / 2; without clipping (0.125 + 0.405) / 2 = 0.265
    v = torch.tensor([[1.5, 1.1, float("inf")]], requires_grad=True)
    old = torch.tensor([[1.0, 1.0, -float("inf")]])
    ret = torch.tensor([[2.0, 2.0, float("nan")]])
    mask = torch.tensor([[True, True, False]])
    loss, clipfrac = value_loss_clipped(v, old, ret, mask, clip_eps=0.2)
    close(loss, 0.3625)
    close(clipfrac, 0.5)
    loss.backward()
    # token 0 clipped: no gradient; token 1: d/dv 0.5 (v - R)^2 / 2 = (1.1 - 2) / 2 = -0.45
    close(v.grad, [[0.0, -0.45, 0.0]])
    loss, clipfrac = value_loss_clipped(v, old, ret, mask, clip_eps=None)
    close(loss, 0.265)
    close(clipfrac, 0.0)


# ---------------------------------------------------------------- from logits


def test_entropy_from_logits():
    # uniform over 4: log 4 = 1.38629
    # p = (0.25, 0.75) from logits (0, log 3): -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.34657 + 0.21576 = 0.56233
    # one-hot through -inf logits: 0, not nan
    inf = float("inf")
    logits = torch.tensor(
        [[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3), -inf, -inf], [5.0, -inf, -inf, -inf]]]
    )
    close(entropy_from_logits(logits), [[1.38629, 0.56233, 0.0]])
    ent = entropy_from_logits(logits.to(torch.bfloat16))
    assert ent.dtype == torch.float32


def test_logprobs_from_logits():
    # logits (0, log 3): p = (0.25, 0.75), so log p = (-1.38629, -0.28768)
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)]]])
    close(logprobs_from_logits(logits, torch.tensor([[1, 0]])), [[-0.28768, -1.38629]])


def test_logprobs_from_bf16_logits_are_computed_in_fp32():
    # The bf16 values, upcast, must give exactly what fp32 gives; a bf16 log_softmax
    # would return bf16 and differ in the third digit at these magnitudes.
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 3, 50, generator=gen) * 20).to(torch.bfloat16)
    labels = torch.randint(0, 50, (2, 3), generator=gen)
    got = logprobs_from_logits(logits, labels)
    assert got.dtype == torch.float32
    want = torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- preference losses


def test_bradley_terry_loss():
    # equal scores: -log sigmoid(0) = log 2 = 0.69315; a tie counts as wrong
    loss, acc = bradley_terry_loss(torch.tensor([0.3, -1.0]), torch.tensor([0.3, -1.0]))
    close(loss, math.log(2))
    close(acc, 0.0)
    # chosen - rejected = 1: -log sigmoid(1) = log(1 + e^-1) = 0.31326; -1: log(1 + e) = 1.31326
    # mean (0.31326 + 1.31326) / 2 = 0.81326, accuracy 1 / 2
    loss, acc = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    close(loss, 0.81326)
    close(acc, 0.5)
    # a margin of 1 cancels a difference of 1: log 2 again
    loss, _ = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), margin=1.0)
    close(loss, math.log(2))


def test_dpo_loss():
    # policy == reference: logits 0, loss log 2, rewards 0, whatever the smoothing
    logps = torch.tensor([-10.0, -3.0])
    for smoothing in (0.0, 0.1):
        loss, chosen, rejected = dpo_loss(
            logps, logps - 1, logps, logps - 1, beta=0.1, label_smoothing=smoothing
        )
        close(loss, math.log(2))
        close(chosen, [0.0, 0.0])
        close(rejected, [0.0, 0.0])
    # beta 0.1; policy chosen -10 vs ref -11: reward 0.1; policy rejected -12 vs ref -11: reward -0.1
    # logits = 0.1 * (1 - (-1)) = 0.2; loss = log(1 + e^-0.2) = 0.59814
    # smoothing 0.1: 0.9 * 0.59814 + 0.1 * log(1 + e^0.2) = 0.53833 + 0.1 * 0.79814 = 0.61814
    pc = torch.tensor([-10.0], requires_grad=True)
    args = (pc, torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]))
    loss, chosen, rejected = dpo_loss(*args, beta=0.1)
    close(loss, 0.59814)
    close(chosen, [0.1])
    close(rejected, [-0.1])
    loss.backward()
    assert pc.grad.item() < 0  # raising the chosen logp lowers the loss
    close(dpo_loss(*args, beta=0.1, label_smoothing=0.1).loss, 0.61814)


# ---------------------------------------------------------------- KL as a loss


def _expected_loss_gradient(estimator: str, logits: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """E_{a ~ pi}[grad of estimator(log pi(a), log ref(a))], summed exactly over a small vocabulary.

    Samples come from the policy but the sampling itself is not differentiated:
    the weights pi(a) are detached, as they are when a loss is averaged over sampled tokens.
    """
    logits = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(logits, -1)
    loss = (logp.exp().detach() * kl_penalty(logp, ref_logp, estimator)).sum()
    (grad,) = torch.autograd.grad(loss, logits)
    return grad


def test_only_k2_as_a_loss_has_the_gradient_of_the_kl():
    # pi = softmax([1, 0, -1]), ref = uniform over 3 tokens.
    logits = torch.tensor([1.0, 0.0, -1.0])
    ref_logp = torch.log(torch.full((3,), 1 / 3))
    exact = logits.clone().requires_grad_(True)
    p = torch.softmax(exact, -1)
    kl_forward = (p * (torch.log(p) - ref_logp)).sum()  # pi = (0.665, 0.245, 0.090): KL = 0.2662 nats
    (want,) = torch.autograd.grad(kl_forward, exact)
    close(kl_forward.item(), 0.2662, atol=1e-4)
    # k2 = (log pi - log ref)^2 / 2 has gradient (log pi - log ref) grad log pi, whose expectation
    # under pi is grad KL(pi || ref) (because E[grad log pi] = 0): the right loss.
    close(_expected_loss_gradient("k2", logits, ref_logp), want, atol=1e-6)
    # k1 = log pi - log ref has gradient grad log pi, whose expectation is 0: it does nothing.
    close(_expected_loss_gradient("k1", logits, ref_logp), torch.zeros(3), atol=1e-6)
    # k3 = ref/pi - 1 - log(ref/pi) has expected gradient -sum ref grad log pi = grad KL(ref || pi).
    reverse = logits.clone().requires_grad_(True)
    q = torch.softmax(reverse, -1)
    (want_reverse,) = torch.autograd.grad((ref_logp.exp() * (ref_logp - torch.log(q))).sum(), reverse)
    close(_expected_loss_gradient("k3", logits, ref_logp), want_reverse, atol=1e-6)
    assert (want_reverse - want).abs().max() > 0.05  # a different direction from the KL we penalise


# ---------------------------------------------------------------- IPO and weighted Bradley-Terry


def test_ipo_by_hand():
    from learner.losses import ipo_loss

    # h = (-1 - -2) - (-3 - -2.5) = 1 - (-0.5) = 1.5; beta 0.5 -> target 1 / (2 * 0.5) = 1; loss (1.5 - 1)^2 = 0.25
    out = ipo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5]), beta=0.5)
    close(out.loss, 0.25)
    close(out.chosen_rewards, [0.5])  # beta * (policy - ref) of chosen = 0.5 * 1
    close(out.rejected_rewards, [-0.25])
    # At the target margin the loss and its gradient vanish, where DPO's would still push.
    h = torch.tensor([0.0], requires_grad=True)
    at_target = ipo_loss(h + 1.0, torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta=0.5)
    at_target.loss.backward()
    close(at_target.loss, 0.0)
    close(h.grad, [0.0])


def test_weighted_bradley_terry_by_hand():
    # diffs 0 and 2: losses log 2 = 0.69315 and log(1 + e^-2) = 0.12693; weights 3 : 1
    # -> (3 * 0.69315 + 0.12693) / 4 = 0.55160
    out = bradley_terry_loss(torch.tensor([0.0, 2.0]), torch.tensor([0.0, 0.0]), weights=torch.tensor([3.0, 1.0]))
    close(out.loss, 0.55160)
