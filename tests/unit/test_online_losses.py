"""Online-training losses and reward shaping against hand-worked values and against TRL 1.16.

Hand-worked cases spell their arithmetic out in the docstrings. The TRL references (test-only
dependency) are TRL's own code run on the same tensors:

* ``GRPOTrainer._compute_loss`` (grpo, bnpo, dr_grpo), called unbound on a stand-in trainer
  whose ``_get_per_token_logps_and_entropies`` hands back the given per-token log-probs and whose
  accelerator's collectives are the identity (one process). Everything after the model forward
  is TRL's code: ratio, clip, k3 KL, reductions, and the ``kl`` / ``clip_ratio`` metrics.
* ``KTOTrainer._compute_loss`` (and, through it, ``_compute_kl_logps``) for loss_type "kto",
  called on a stand-in trainer with precomputed reference log-probs and a stub model whose
  "forward" returns one summed log-prob per row, looked up from the row's first token id.
  (TRL 1.16 has no separate ``kto_loss`` method any more; the loss is inline in ``_compute_loss``.)

Not callable in isolation: GRPO's advantage computation is inline in
``GRPOTrainer._generate_and_score_completions``, which also generates completions and runs the
reward functions, so :func:`group_advantages` is compared with the same lines of that method
re-typed here around TRL's own ``nanstd``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from whetstone.losses import GRPOLoss, KTOLoss, group_advantages, kto_reference_point
from whetstone.online.rewards import best_vs_worst, shape_rewards

from tests.conftest import free_port

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

ATOL = 1e-6
LN2 = math.log(2.0)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@pytest.fixture(scope="module")
def trl() -> SimpleNamespace:
    """TRL 1.16's GRPO and KTO trainer modules and its ``nanstd``; tests needing them skip without TRL."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SimpleNamespace(
            grpo=pytest.importorskip("trl.trainer.grpo_trainer"),
            kto=pytest.importorskip("trl.trainer.kto_trainer"),
            utils=pytest.importorskip("trl.trainer.utils"),
        )


# ---------------------------------------------------------------------------------------------
# group_advantages


def test_group_advantages_by_hand():
    """Bessel std (k - 1), eps added to the std, NaN left out and given 0, equal groups 0.

    row 0 [1, 2, 3]: mean 2, std sqrt((1 + 0 + 1) / 2) = 1 -> [-1, 0, 1] / (1 + 1e-4)
    row 1 [4, 4, 4]: mean 4, std 0 -> [0, 0, 0]
    row 2 [1, 3, nan]: mean 2, std sqrt((1 + 1) / 1) = sqrt 2 -> [-1, 1, 0] / (sqrt 2 + 1e-4)
    """
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0], [1.0, 3.0, float("nan")]])
    expected = torch.tensor(
        [
            [-1 / 1.0001, 0.0, 1 / 1.0001],
            [0.0, 0.0, 0.0],
            [-1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4), 0.0],
        ]
    )
    torch.testing.assert_close(group_advantages(rewards), expected, atol=ATOL, rtol=0)
    unscaled = torch.tensor([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [-1.0, 1.0, 0.0]])
    torch.testing.assert_close(group_advantages(rewards, scale=False), unscaled, atol=ATOL, rtol=0)
    # k = 1: TRL sets the std to 0, so the advantage is 0 / eps = 0.
    assert group_advantages(torch.tensor([[5.0], [7.0]])).tolist() == [[0.0], [0.0]]
    # integer rewards come back as float32
    assert group_advantages(torch.tensor([[0, 1]])).dtype == torch.float32


def _trl_advantages(trl, rewards: torch.Tensor, scale_rewards: str) -> torch.Tensor:
    """The advantage lines of TRL 1.16 ``GRPOTrainer._generate_and_score_completions``
    (multi_objective_aggregation="sum_then_normalize", one reward function), around TRL's nanstd."""
    num_generations = rewards.shape[1]
    rewards = rewards.reshape(-1)
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    std_rewards = trl.utils.nanstd(rewards.view(-1, num_generations), dim=1)
    std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0).view(-1, num_generations)


def test_group_advantages_match_trl(trl):
    gen = torch.Generator().manual_seed(7)
    rewards = torch.randn(6, 4, generator=gen) * 3
    rewards[1] = 0.5  # a constant group
    rewards[2, 3] = float("nan")  # an unscorable sample
    torch.testing.assert_close(
        group_advantages(rewards), _trl_advantages(trl, rewards, "group"), atol=ATOL, rtol=0
    )
    torch.testing.assert_close(
        group_advantages(rewards, scale=False), _trl_advantages(trl, rewards, "none"), atol=ATOL, rtol=0
    )


# ---------------------------------------------------------------------------------------------
# GRPOLoss by hand


def _hand_batch() -> dict[str, torch.Tensor]:
    """N = 2 samples, T = 3; sample 1's last token is padding holding -inf / NaN on purpose.

    ratios pi/pi_old: row 0 [1.0, 1.5, 0.9] with A = +2; row 1 [0.7, 1.1, pad] with A = -1.
    ref - logp: ln 2 at (0, 0), -ln 2 at (1, 1), 0 elsewhere, so k3 = e^d - d - 1 is
    1 - ln 2 at (0, 0), ln 2 - 1/2 at (1, 1), 0 elsewhere; their sum is exactly 1/2.
    """
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.3, float("-inf")]])
    ratios = torch.tensor([[1.0, 1.5, 0.9], [0.7, 1.1, 1.0]])
    old = logps - torch.log(ratios)
    old[1, 2] = float("nan")
    delta = torch.tensor([[LN2, 0.0, 0.0], [0.0, -LN2, 0.0]])
    ref = logps + delta
    ref[1, 2] = float("nan")
    return {
        "logps": logps.requires_grad_(),
        "old_logps": old,
        "ref_logps": ref,
        "advantages": torch.tensor([2.0, -1.0]),
        "mask": torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]),
    }


def test_grpo_loss_by_hand():
    """eps 0.2, beta 0.1. Token losses -min(rho A, clip(rho, 0.8, 1.2) A) + 0.1 k3:

    row 0, A = 2:  rho 1   -> -2      + 0.1 (1 - ln 2)
                   rho 1.5 -> -min(3, 2.4) = -2.4   (clipped: rho > 1.2, A > 0)
                   rho 0.9 -> -1.8
    row 1, A = -1: rho 0.7 -> -min(-0.7, -0.8) = 0.8 (clipped: rho < 0.8, A < 0)
                   rho 1.1 -> 1.1    + 0.1 (ln 2 - 1/2)
    grpo:    mean(row 0 sum / 3, row 1 sum / 2)
    bnpo:    (-6.2 + 1.9 + 0.1 * 1/2) / 5 = -4.25 / 5 = -0.85
    dr_grpo: -4.25 / (N * L) = -4.25 / (2 * 4) = -0.53125 with max_completion_length L = 4
    kl = (1/2) / 5 = 0.1; clip_ratio = 2 / 5; ratio_mean = (1 + 1.5 + 0.9 + 0.7 + 1.1) / 5 = 1.04.
    """
    row0 = (-2.0 + 0.1 * (1 - LN2) - 2.4 - 1.8) / 3
    row1 = (0.8 + 1.1 + 0.1 * (LN2 - 0.5)) / 2
    expected = {"grpo": (row0 + row1) / 2, "bnpo": -0.85, "dr_grpo": -0.53125}
    for loss_type, value in expected.items():
        batch = _hand_batch()
        out = GRPOLoss(epsilon_low=0.2, beta=0.1, loss_type=loss_type, max_completion_length=4)(**batch)
        assert out.loss.item() == pytest.approx(value, abs=ATOL), loss_type
        assert out.kl.item() == pytest.approx(0.1, abs=ATOL)
        assert out.clip_ratio.item() == pytest.approx(0.4, abs=ATOL)
        assert out.ratio_mean.item() == pytest.approx(1.04, abs=ATOL)
        assert not (out.kl.requires_grad or out.clip_ratio.requires_grad or out.ratio_mean.requires_grad)
        out.loss.backward()
        grad = batch["logps"].grad
        assert torch.isfinite(grad).all() and grad[1, 2] == 0.0, "padding must not leak into the gradient"


def test_grpo_epsilon_high_and_bool_mask():
    """eps_low 0.2, eps_high 0.6: rho 1.5 at (0, 1) is no longer clipped (1.5 < 1.6), so its token
    loss is -3 instead of -2.4, only (1, 0) is clipped; bnpo = (-4.25 - 0.6) / 5 = -0.97."""
    batch = _hand_batch()
    batch["mask"] = batch["mask"].bool()
    out = GRPOLoss(epsilon_low=0.2, epsilon_high=0.6, beta=0.1, loss_type="bnpo")(**batch)
    assert out.loss.item() == pytest.approx(-0.97, abs=ATOL)
    assert out.clip_ratio.item() == pytest.approx(0.2, abs=ATOL)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_grpo_gradient_on_fresh_samples(loss_type):
    """old_logps None (ratio 1, gradient grad logp): d loss / d logp_it = (-A_i + beta (1 - e^d_it)) / D_i
    with D_i = |o_i| N (grpo), the number of masked tokens (bnpo), N L (dr_grpo); 0 on padding.

    Here |o| = [3, 2], N = 2, 5 tokens, L = 5: D = [6, 4] (grpo), 5 (bnpo), 10 (dr_grpo).
    For beta 0 and grpo that is the spec's -A_i / |o_i| per token (over the N sequences).
    """
    batch = _hand_batch()
    batch["logps"] = batch["logps"].detach().masked_fill(batch["mask"] == 0, 0.0).requires_grad_()
    delta = torch.tensor([[LN2, 0.0, 0.0], [0.0, -LN2, 0.0]])
    batch["ref_logps"] = batch["logps"].detach() + delta
    denominators = {
        "grpo": torch.tensor([[6.0], [4.0]]),
        "bnpo": torch.tensor(5.0),
        "dr_grpo": torch.tensor(10.0),
    }
    for beta in (0.0, 0.1):
        batch["logps"].grad = None
        out = GRPOLoss(beta=beta, loss_type=loss_type, max_completion_length=5)(
            batch["logps"], None, batch["ref_logps"], batch["advantages"], batch["mask"]
        )
        assert out.ratio_mean.item() == 1.0 and out.clip_ratio.item() == 0.0
        out.loss.backward()
        numerator = -batch["advantages"].unsqueeze(1) + beta * (1.0 - torch.exp(delta))
        expected = numerator / denominators[loss_type] * batch["mask"]
        torch.testing.assert_close(batch["logps"].grad, expected, atol=ATOL, rtol=0)
    # Without a reference and beta 0 the loss is the policy term alone and kl is reported as 0.
    out = GRPOLoss(beta=0.0)(batch["logps"], None, None, batch["advantages"], batch["mask"])
    assert out.kl.item() == 0.0
    assert out.loss.item() == pytest.approx(-(2.0 * 3 / 3 - 1.0 * 2 / 2) / 2, abs=ATOL)


def test_grpo_input_checks():
    batch = _hand_batch()
    with pytest.raises(ValueError, match="ref_logps is None but beta=0.04"):
        GRPOLoss()(batch["logps"], None, None, batch["advantages"], batch["mask"])
    with pytest.raises(ValueError, match=r"old_logps must have the shape of logps \(2, 3\)"):
        GRPOLoss()(
            batch["logps"], batch["old_logps"][:, :2], batch["ref_logps"], batch["advantages"], batch["mask"]
        )
    with pytest.raises(ValueError, match=r"advantages must have shape \(2,\)"):
        GRPOLoss()(batch["logps"], None, batch["ref_logps"], batch["advantages"][:1], batch["mask"])
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        GRPOLoss()(batch["logps"], None, batch["ref_logps"], batch["advantages"], batch["mask"] * 0.5)
    with pytest.raises(ValueError, match="more than max_completion_length=2"):
        GRPOLoss(loss_type="dr_grpo", max_completion_length=2)(**batch)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        GRPOLoss(loss_type="dapo")


# ---------------------------------------------------------------------------------------------
# GRPOLoss against TRL's GRPOTrainer._compute_loss


def _trl_grpo(trl, loss_type, eps_low, eps_high, beta, max_len, logps, old, ref, advantages, mask):
    """TRL 1.16 GRPOTrainer._compute_loss on given per-token log-probs; returns (loss, metrics)."""
    n, t = logps.shape
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(reduce=lambda x, reduction: x, gather=lambda x: x),
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
        use_vllm=False, vllm_importance_sampling_correction=False, current_gradient_accumulation_steps=1,
        max_completion_length=max_len, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
    )  # fmt: skip
    inputs = {
        "prompt_ids": torch.zeros(n, 1, dtype=torch.long),
        "prompt_mask": torch.ones(n, 1, dtype=torch.long),
        "completion_ids": torch.zeros(n, t, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": advantages,
        "ref_per_token_logps": ref,
    }
    if old is not None:
        inputs["old_per_token_logps"] = old
    loss = trl.grpo.GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize(("eps_low", "eps_high", "beta", "fresh"), [(0.2, 0.2, 0.04, False), (0.2, 0.28, 0.0, False),
                                                                    (0.1, 0.3, 0.1, True)])  # fmt: skip
def test_grpo_loss_matches_trl(trl, loss_type, eps_low, eps_high, beta, fresh):
    gen = torch.Generator().manual_seed(11)
    n, t = 6, 7
    base = -torch.rand(n, t, generator=gen) * 3
    old = None if fresh else base + torch.randn(n, t, generator=gen) * 0.3  # ratios around 1, some clipped
    ref = base + torch.randn(n, t, generator=gen) * 0.5
    advantages = group_advantages(torch.randn(2, 3, generator=gen)).reshape(-1)
    lengths = torch.tensor([7, 3, 5, 1, 6, 2])
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).float()
    ours_logps, trl_logps = base.clone().requires_grad_(), base.clone().requires_grad_()
    out = GRPOLoss(eps_low, eps_high, beta, loss_type, max_completion_length=9)(
        ours_logps, old, ref, advantages, mask
    )
    trl_loss, metrics = _trl_grpo(
        trl, loss_type, eps_low, eps_high, beta, 9, trl_logps, old, ref, advantages, mask
    )
    assert out.loss.item() == pytest.approx(trl_loss.item(), abs=ATOL)
    out.loss.backward()
    trl_loss.backward()
    torch.testing.assert_close(ours_logps.grad * mask, trl_logps.grad * mask, atol=1e-7, rtol=1e-5)
    assert out.clip_ratio.item() == pytest.approx(metrics["clip_ratio/region_mean"][-1], abs=ATOL)
    if not fresh:
        assert out.clip_ratio.item() > 0, "the case should exercise the clip"
    if beta != 0.0:  # TRL logs the KL only when it uses it
        assert out.kl.item() == pytest.approx(metrics["kl"][-1], abs=ATOL)


# ---------------------------------------------------------------------------------------------
# KTO by hand


def test_kto_loss_by_hand():
    """beta 0.5, z0 1, w_d 1, w_u 2; h = log-ratio = [3, -1, 1, 0], desirable [T, F, T, F]:

    row 0 (d): 1 - sig(0.5 (3 - 1))          = 1 - sig(1)
    row 1 (u): 2 (1 - sig(0.5 (1 - (-1))))   = 2 (1 - sig(1))
    row 2 (d): 1 - sig(0.5 (1 - 1))          = 1/2
    row 3 (u): 2 (1 - sig(0.5 (1 - 0)))      = 2 (1 - sig(0.5))
    rewards 0.5 h = [1.5, -0.5, 0.5, 0]. d loss_i / d h_i = -w beta s (1 - s) (desirable),
    +w beta s (1 - s) (undesirable), with s the sigmoid above; the mean divides by 4.
    """
    policy = torch.tensor([-7.0, -11.0, -9.0, -10.0], requires_grad=True)
    reference = torch.tensor([-10.0, -10.0, -10.0, -10.0])
    desirable = torch.tensor([True, False, True, False])
    out = KTOLoss(beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)(
        policy, reference, desirable, torch.tensor(1.0)
    )
    s1, s05 = sigmoid(1.0), sigmoid(0.5)
    expected = [1 - s1, 2 * (1 - s1), 0.5, 2 * (1 - s05)]
    torch.testing.assert_close(out.losses, torch.tensor(expected), atol=ATOL, rtol=0)
    torch.testing.assert_close(out.rewards, torch.tensor([1.5, -0.5, 0.5, 0.0]), atol=ATOL, rtol=0)
    assert out.desirable.tolist() == [True, False, True, False] and not out.rewards.requires_grad
    assert out.reduce().item() == pytest.approx(sum(expected) / 4, abs=ATOL)
    out.reduce().backward()
    grads = [-0.5 * s1 * (1 - s1), 2 * 0.5 * s1 * (1 - s1), -0.5 * 0.25, 2 * 0.5 * s05 * (1 - s05)]
    torch.testing.assert_close(policy.grad, torch.tensor(grads) / 4, atol=ATOL, rtol=0)


def test_kto_reference_point_by_hand():
    """diffs [1, -1, 2] -> mean 2/3; diffs [-1, -2] -> mean -3/2, clamped to 0; never any grad."""
    policy = torch.tensor([-10.0, -12.0, -9.0], requires_grad=True)
    z0 = kto_reference_point(policy, torch.tensor([-11.0, -11.0, -11.0]))
    assert z0.item() == pytest.approx(2 / 3, abs=ATOL)
    assert z0.dim() == 0 and not z0.requires_grad and z0.dtype == torch.float32
    assert kto_reference_point(torch.tensor([-3.0, -4.0]), torch.tensor([-2.0, -2.0])).item() == 0.0
    with pytest.raises(ValueError, match="empty on every worker"):
        kto_reference_point(torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="reference_logps has 2 rows but policy_logps has 3"):
        kto_reference_point(policy, torch.zeros(2))


def test_kto_input_checks():
    args = (torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="reference_point must be finite and >= 0"):
        KTOLoss()(*args, torch.tensor([True, False]), torch.tensor(-0.1))
    with pytest.raises(ValueError, match="reference_point must be 0-d"):
        KTOLoss()(*args, torch.tensor([True, False]), torch.zeros(2))
    with pytest.raises(ValueError, match="desirable must be a bool tensor"):
        KTOLoss()(*args, torch.tensor([1, 0]), 0.0)
    with pytest.raises(ValueError, match="desirable has 3 rows but policy_logps has 2"):
        KTOLoss()(*args, torch.tensor([True, False, True]), 0.0)


# ---------------------------------------------------------------------------------------------
# KTO against TRL's KTOTrainer._compute_loss


class _SummedLogpStub(nn.Module):
    """Stands in for TRL's fused-LM-head model: row r's summed log-prob is ``table[input_ids[r, 0]]``,
    returned as a single per-token column (inputs are 2 tokens wide, so TRL keeps 1 column)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.train()

    def forward(self, input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
        log_probs = self.table[input_ids[:, 0]].unsqueeze(1)  # (B, 1)
        zeros = torch.zeros_like(log_probs).detach()
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros)


def _trl_kto(trl, beta, w_d, w_u, policy, reference, labels, kl_policy, kl_reference):
    """TRL 1.16 KTOTrainer._compute_loss (loss_type "kto", precomputed reference log-probs).

    ``policy`` is a leaf with grad; rows 0..B-1 of the stub's table are it, rows B.. the KL rows.
    Returns (mean loss, metrics)."""
    b, m = policy.shape[0], kl_policy.shape[0]
    model = _SummedLogpStub(torch.cat([policy, kl_policy.detach()]))
    trainer = SimpleNamespace(
        model=model, accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x),
        calculate_KL=True, aux_loss_enabled=False, precompute_ref_logps=True, loss_type="kto", beta=beta,
        desirable_weight=w_d, undesirable_weight=w_u, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1, args=SimpleNamespace(),
    )  # fmt: skip
    trainer._compute_kl_logps = lambda mdl, batch: trl.kto.KTOTrainer._compute_kl_logps(trainer, mdl, batch)
    ids = torch.zeros(b, 2, dtype=torch.long)
    ids[:, 0] = torch.arange(b)
    kl_ids = torch.zeros(m, 2, dtype=torch.long)
    kl_ids[:, 0] = torch.arange(b, b + m)
    inputs = {
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": torch.ones_like(ids),
        "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_ids),
        "KL_completion_mask": torch.ones_like(kl_ids), "label": labels,
        "ref_logps": reference, "ref_KL_logps": kl_reference,
    }  # fmt: skip
    loss = trl.kto.KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize(("beta", "w_d", "w_u", "kl_shift"), [(0.1, 1.0, 1.0, 2.0), (0.3, 1.33, 0.8, 1.0),
                                                              (0.05, 1.0, 1.5, -3.0)])  # fmt: skip
def test_kto_loss_matches_trl(trl, beta, w_d, w_u, kl_shift):
    """Mean loss, gradient, z0 and the reward metrics as TRL computes them; per-row losses from
    batch-of-one calls (the KL rows stay the whole set, so z0 is the same). kl_shift < 0 makes the
    KL estimate negative, so both clamp z0 to 0."""
    gen = torch.Generator().manual_seed(3)
    b, m = 8, 8
    policy_values = -torch.rand(b, generator=gen) * 40 - 5
    reference = policy_values + torch.randn(b, generator=gen) * 4
    labels = torch.tensor([True, False, True, True, False, False, True, False])
    kl_policy = -torch.rand(m, generator=gen) * 40 - 5
    kl_reference = kl_policy - kl_shift + torch.randn(m, generator=gen)
    z0 = kto_reference_point(kl_policy, kl_reference)
    if kl_shift < 0:
        assert z0.item() == 0.0
    ours_policy, trl_policy = policy_values.clone().requires_grad_(), policy_values.clone().requires_grad_()
    out = KTOLoss(beta, w_d, w_u)(ours_policy, reference, labels, z0)
    trl_loss, metrics = _trl_kto(trl, beta, w_d, w_u, trl_policy, reference, labels, kl_policy, kl_reference)
    assert out.reduce().item() == pytest.approx(trl_loss.item(), abs=ATOL)
    assert z0.item() == pytest.approx(metrics["kl"][-1], abs=1e-5)
    assert out.rewards[labels].mean().item() == pytest.approx(metrics["rewards/chosen"][-1], abs=1e-5)
    assert out.rewards[~labels].mean().item() == pytest.approx(metrics["rewards/rejected"][-1], abs=1e-5)
    out.reduce().backward()
    trl_loss.backward()
    torch.testing.assert_close(ours_policy.grad, trl_policy.grad, atol=1e-8, rtol=1e-5)
    for i in range(b):
        one, _ = _trl_kto(trl, beta, w_d, w_u, policy_values[i : i + 1].clone().requires_grad_(),
                          reference[i : i + 1], labels[i : i + 1], kl_policy, kl_reference)  # fmt: skip
        assert out.losses[i].item() == pytest.approx(one.item(), abs=ATOL), f"row {i}"


# ---------------------------------------------------------------------------------------------
# kto_reference_point across two gloo workers


def _reference_point_worker(rank: int, world_size: int, port: int, parts: list, out_dir: str) -> None:
    """z0 on this rank's rows, all-reduced and local, saved for the parent to compare."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        policy, reference = parts[rank]
        torch.save(
            {
                "global": kto_reference_point(policy, reference),
                "local": kto_reference_point(policy, reference, False),
            },
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_kto_reference_point_is_one_value_across_two_gloo_workers(tmp_path):
    """Rank 0 holds 3 rows with log-ratios [1, 2, 3], rank 1 holds 1 row with log-ratio -2.

    Global: (1 + 2 + 3 - 2) / 4 = 1 on both ranks; local: 2 and max(0, -2) = 0.
    """
    parts = [
        (torch.tensor([-9.0, -8.0, -7.0]), torch.tensor([-10.0, -10.0, -10.0])),
        (torch.tensor([-12.0]), torch.tensor([-10.0])),
    ]
    torch.multiprocessing.spawn(
        _reference_point_worker, args=(2, free_port(), parts, str(tmp_path)), nprocs=2, join=True
    )
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["global"].item() for r in results] == [1.0, 1.0]
    assert [r["local"].item() for r in results] == [2.0, 0.0]


# ---------------------------------------------------------------------------------------------
# best_vs_worst and shape_rewards


def test_best_vs_worst_by_hand():
    """row 0: max 0.5 at 1 and 2 -> 1 (lowest index), min -1 at 3; row 1 all equal -> invalid
    (indices 0, 0); row 2: max 3 at 0 and 2 -> 0, min 1 at 1 and 3 -> 1."""
    rewards = np.array([[0.1, 0.5, 0.5, -1.0], [2.0, 2.0, 2.0, 2.0], [3.0, 1.0, 3.0, 1.0]])
    chosen, rejected, valid = best_vs_worst(rewards)
    assert (
        chosen.tolist() == [1, 0, 0]
        and rejected.tolist() == [3, 0, 1]
        and valid.tolist() == [True, False, True]
    )
    assert chosen.dtype == np.int64 and rejected.dtype == np.int64 and valid.dtype == np.bool_
    assert best_vs_worst(np.array([[1.0], [2.0]]))[2].tolist() == [False, False]  # k = 1: no preference
    with pytest.raises(ValueError, match=r"rewards\[1, 2\] is nan"):
        best_vs_worst(np.array([[1.0, 2.0, 3.0], [1.0, 2.0, np.nan]]))
    with pytest.raises(ValueError, match=r"rewards must have shape \(P, k\)"):
        best_vs_worst(np.array([1.0, 2.0]))


def test_shape_rewards_by_hand():
    """rewards [[1, 3], [2, 2]], lengths [[10, 20], [10, 20]]:
    lengths - mean = [[-5, 5], [-5, 5]], rewards - mean = [[-1, 1], [0, 0]],
    slope = (5 + 5 + 0 + 0) / (25 * 4) = 0.1 -> rewards - 0.1 (len - 15) = [[1.5, 2.5], [2.5, 1.5]];
    then a penalty of 0.01 per token takes [[0.1, 0.2], [0.1, 0.2]] off: [[1.4, 2.3], [2.4, 1.3]].
    """
    rewards = np.array([[1.0, 3.0], [2.0, 2.0]])
    lengths = np.array([[10, 20], [10, 20]])
    normalised = shape_rewards(rewards, lengths, length_normalise=True)
    np.testing.assert_allclose(normalised, [[1.5, 2.5], [2.5, 1.5]], atol=1e-6)
    both = shape_rewards(rewards, lengths, length_penalty=0.01, length_normalise=True)
    np.testing.assert_allclose(both, [[1.4, 2.3], [2.4, 1.3]], atol=1e-6)
    penalty = shape_rewards(rewards, lengths, length_penalty=0.01)  # [[1 - 0.1, 3 - 0.2], [2 - 0.1, 2 - 0.2]]
    np.testing.assert_allclose(penalty, [[0.9, 2.8], [1.9, 1.8]], atol=1e-6)
    assert normalised.dtype == both.dtype == penalty.dtype == np.float32
    assert shape_rewards(rewards, lengths).tolist() == [[1.0, 3.0], [2.0, 2.0]]
    # equal lengths: nothing to fit, slope 0
    np.testing.assert_allclose(shape_rewards(rewards, np.full((2, 2), 7), length_normalise=True), rewards)


def test_shape_rewards_removes_the_length_trend():
    """A reward that pays 0.05 per token plus noise: after normalising, the mean is kept and the
    correlation with length is gone (least-squares residuals are orthogonal to the regressor)."""
    rng = np.random.default_rng(5)
    lengths = rng.integers(5, 200, size=(16, 4))
    rewards = 0.05 * lengths + rng.normal(size=(16, 4))
    assert np.corrcoef(lengths.ravel(), rewards.ravel())[0, 1] > 0.9
    shaped = shape_rewards(rewards, lengths, length_normalise=True)
    assert abs(np.corrcoef(lengths.ravel(), shaped.ravel())[0, 1]) < 1e-5
    assert shaped.mean() == pytest.approx(rewards.mean(), abs=1e-5)


def test_shape_rewards_checks():
    rewards = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"lengths must have the shape of rewards \(2, 3\)"):
        shape_rewards(rewards, np.zeros((3, 2), dtype=int))
    with pytest.raises(ValueError, match="lengths must be integers >= 0"):
        shape_rewards(rewards, np.full((2, 3), -1))
    with pytest.raises(ValueError, match="lengths must be integers >= 0"):
        shape_rewards(rewards, np.full((2, 3), 1.5))
    with pytest.raises(ValueError, match="length_penalty must be finite and >= 0"):
        shape_rewards(rewards, np.ones((2, 3), dtype=int), length_penalty=-0.1)
