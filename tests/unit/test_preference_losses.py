"""Preference losses against independent references on the same log-probs.

Where TRL 1.16 has the loss, its own code is the reference (test-only dependency): DPOTrainer's
``_compute_loss`` (sigmoid, IPO, hinge), CPOTrainer's ``cpo_loss`` (SimPO; and cDPO, since its
"sigmoid" with label smoothing on log-ratios is exactly conservative DPO), ORPOTrainer's
``odds_ratio_loss`` and RewardTrainer's ``compute_loss`` (Bradley–Terry). TRL's trainers compute
the loss inside methods that read a few attributes of the trainer, so each is called on a minimal
stand-in object carrying just those attributes; the DPO one also needs a model, and gets a stub
whose "forward" returns the given per-token log-probs. TRL reduces DPO losses to a batch mean, so
per-example values come from batch-of-one calls. NPO and the time discount have no TRL
counterpart and are checked against values worked out by hand in the docstrings.
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
from torch import nn
from whetstone.losses.bradley_terry import BradleyTerryLoss
from whetstone.losses.dpo import DPOLoss
from whetstone.losses.npo import NPOLoss
from whetstone.losses.ns_dpo import NSDPOLoss
from whetstone.losses.orpo import ORPOLoss
from whetstone.losses.preference_base import time_discount_weights, time_weight_keep_mask
from whetstone.losses.simpo import SimPOLoss

from tests.conftest import free_port
from tests.unit.ns_dpo_dist_worker import ns_dpo_worker

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

ATOL = 1e-5
CPU = torch.device("cpu")
ACCELERATOR = SimpleNamespace(device=CPU, gather=lambda x: x, gather_for_metrics=lambda x: x)


@pytest.fixture(scope="module")
def trl() -> SimpleNamespace:
    """TRL 1.16's trainer modules (test-only dependency); tests needing them skip without it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SimpleNamespace(
            dpo=pytest.importorskip("trl.trainer.dpo_trainer"),
            reward=pytest.importorskip("trl.trainer.reward_trainer"),
            cpo=pytest.importorskip("trl.experimental.cpo.cpo_trainer"),
            orpo=pytest.importorskip("trl.experimental.orpo.orpo_trainer"),
        )


@pytest.fixture(scope="module")
def logps() -> dict[str, torch.Tensor]:
    """Random summed log-probs for B = 12 pairs, plus token counts, a NLL and time steps."""
    gen = torch.Generator().manual_seed(1234)
    size = 12
    policy_chosen = -torch.rand(size, generator=gen) * 60 - 5
    policy_rejected = -torch.rand(size, generator=gen) * 60 - 5
    return {
        "policy_chosen_logps": policy_chosen,
        "policy_rejected_logps": policy_rejected,
        # The reference sits near the policy, as it does in training, so the losses are not saturated.
        "reference_chosen_logps": policy_chosen + torch.randn(size, generator=gen) * 3,
        "reference_rejected_logps": policy_rejected + torch.randn(size, generator=gen) * 3,
        "chosen_token_counts": torch.randint(1, 40, (size,), generator=gen),
        "rejected_token_counts": torch.randint(1, 40, (size,), generator=gen),
        "chosen_nll": torch.rand(size, generator=gen) * 4,
        "time_steps": torch.randint(0, 10, (size,), generator=gen),
    }


class _LogProbStub(nn.Module):
    """Stands in for TRL's fused-LM-head model: 'forward' returns fixed per-token log-probs."""

    def __init__(self, per_token: torch.Tensor) -> None:
        super().__init__()
        self.per_token = per_token
        self.eval()

    def forward(self, **_: object) -> SimpleNamespace:
        zeros = torch.zeros_like(self.per_token)
        return SimpleNamespace(log_probs=self.per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def _trl_dpo(trl, loss_type: str, beta: float, pc, pr, rc, rr, chosen_counts, rejected_counts) -> tuple[float, dict]:
    """TRL DPOTrainer._compute_loss on given summed log-probs; returns (mean loss, metrics)."""
    size = pc.shape[0]
    width = int(max(chosen_counts.max(), rejected_counts.max())) + 1
    per_token = torch.zeros(2 * size, width - 1)  # (2B, S): the sum sits in column 0
    per_token[:, 0] = torch.cat([pc, pr])
    completion_mask = torch.zeros(2 * size, width, dtype=torch.long)  # IPO reads its row sums
    for row, count in enumerate(torch.cat([chosen_counts, rejected_counts]).tolist()):
        completion_mask[row, :count] = 1
    model = _LogProbStub(per_token)
    trainer = SimpleNamespace(
        model=model, accelerator=ACCELERATOR, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=0.0, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1, args=SimpleNamespace(),
    )  # fmt: skip
    inputs = {
        "input_ids": torch.zeros(2 * size, width, dtype=torch.long),
        "attention_mask": torch.ones(2 * size, width, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    loss = trl.dpo.DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return float(loss), trainer._metrics["eval"]


@pytest.mark.parametrize(("loss_type", "beta"), [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1), ("hinge", 0.2)])
def test_dpo_variants_match_trl_per_example(trl, logps, loss_type, beta):
    ours = DPOLoss(beta=beta, loss_type=loss_type)(
        logps["policy_chosen_logps"], logps["policy_rejected_logps"],
        logps["reference_chosen_logps"], logps["reference_rejected_logps"],
        logps["chosen_token_counts"], logps["rejected_token_counts"],
    )  # fmt: skip
    keys = ["policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps",
            "chosen_token_counts", "rejected_token_counts"]  # fmt: skip
    for i in range(ours.losses.shape[0]):
        one = [logps[k][i : i + 1] for k in keys]
        trl_loss, metrics = _trl_dpo(trl, loss_type, beta, *one)
        assert abs(ours.losses[i].item() - trl_loss) < ATOL, f"pair {i}"
        assert abs(ours.chosen_rewards[i].item() - metrics["rewards/chosen"][-1]) < ATOL
        assert abs(ours.rejected_rewards[i].item() - metrics["rewards/rejected"][-1]) < ATOL
    trl_mean, metrics = _trl_dpo(trl, loss_type, beta, *[logps[k] for k in keys])
    assert abs(ours.reduce().item() - trl_mean) < ATOL
    assert abs(ours.accuracies.mean().item() - metrics["rewards/accuracies"][-1]) < ATOL
    assert abs(ours.margins.mean().item() - metrics["rewards/margins"][-1]) < ATOL
    # The losses must actually vary, or the comparison proves little.
    assert ours.losses.std() > 1e-3


def _cpo_trainer(loss_type: str, beta: float, label_smoothing: float, simpo_gamma: float = 0.0):
    return SimpleNamespace(
        alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
        simpo_gamma=simpo_gamma, accelerator=ACCELERATOR,
    )  # fmt: skip


@pytest.mark.parametrize("label_smoothing", [0.1, 0.3])
def test_conservative_dpo_matches_trl(trl, logps, label_smoothing):
    """cDPO = TRL CPO 'sigmoid' with label smoothing applied to log-ratios instead of log-probs.

    Hand check for one pair: beta = 0.1, gap of log-ratios 10 -> z = 1, eps = 0.1:
    0.9 * -log sigma(1) + 0.1 * -log sigma(-1) = 0.9 * 0.313262 + 0.1 * 1.313262 = 0.413262.
    """
    chosen_ratio = logps["policy_chosen_logps"] - logps["reference_chosen_logps"]
    rejected_ratio = logps["policy_rejected_logps"] - logps["reference_rejected_logps"]
    trl_losses, _, _ = trl.cpo.CPOTrainer.cpo_loss(_cpo_trainer("sigmoid", 0.1, label_smoothing), chosen_ratio, rejected_ratio)
    ours = DPOLoss(beta=0.1, label_smoothing=label_smoothing)(
        logps["policy_chosen_logps"], logps["policy_rejected_logps"],
        logps["reference_chosen_logps"], logps["reference_rejected_logps"],
    )  # fmt: skip
    torch.testing.assert_close(ours.losses, trl_losses, atol=ATOL, rtol=0)
    one = DPOLoss(beta=0.1, label_smoothing=0.1)(torch.tensor([-10.0]), torch.tensor([-20.0]), torch.zeros(1), torch.zeros(1))
    assert abs(one.losses.item() - 0.413262) < 1e-5


@pytest.mark.parametrize(("beta", "margin", "label_smoothing"), [(2.0, 1.0, 0.0), (2.5, 0.5, 0.0), (2.0, 1.6, 0.1)])
def test_simpo_matches_trl(trl, logps, beta, margin, label_smoothing):
    counts_c, counts_r = logps["chosen_token_counts"], logps["rejected_token_counts"]
    mean_c = logps["policy_chosen_logps"] / counts_c
    mean_r = logps["policy_rejected_logps"] / counts_r
    trainer = _cpo_trainer("simpo", beta, label_smoothing, simpo_gamma=margin)
    trl_losses, trl_chosen, trl_rejected = trl.cpo.CPOTrainer.cpo_loss(trainer, mean_c, mean_r)
    ours = SimPOLoss(beta=beta, target_margin=margin, label_smoothing=label_smoothing)(
        logps["policy_chosen_logps"], logps["policy_rejected_logps"], counts_c, counts_r
    )
    torch.testing.assert_close(ours.losses, trl_losses, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.chosen_rewards, trl_chosen, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.rejected_rewards, trl_rejected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("beta", [0.1, 0.25])
def test_orpo_matches_trl(trl, logps, beta):
    """TRL returns beta * log sigma(log odds); its full loss is NLL - that, which we check per example."""
    counts_c, counts_r = logps["chosen_token_counts"], logps["rejected_token_counts"]
    mean_c = logps["policy_chosen_logps"] / counts_c
    mean_r = logps["policy_rejected_logps"] / counts_r
    trainer = SimpleNamespace(beta=beta, accelerator=ACCELERATOR)
    ratio_terms, trl_chosen, trl_rejected, _, _ = trl.orpo.ORPOTrainer.odds_ratio_loss(trainer, mean_c, mean_r)
    loss = ORPOLoss(beta=beta)
    ours = loss(logps["policy_chosen_logps"], logps["policy_rejected_logps"], counts_c, counts_r, logps["chosen_nll"])
    torch.testing.assert_close(ours.losses, logps["chosen_nll"] - ratio_terms, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.chosen_rewards, trl_chosen, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.rejected_rewards, trl_rejected, atol=ATOL, rtol=0)
    default = loss(logps["policy_chosen_logps"], logps["policy_rejected_logps"], counts_c, counts_r)
    torch.testing.assert_close(default.losses, -mean_c - ratio_terms, atol=ATOL, rtol=0)


def test_npo_hand_computed_and_formula(logps):
    """NPO: L = (2/beta) log(1 + (pi/pi_ref)^beta).

    By hand: beta = 0.5, log pi - log pi_ref = log 4 -> ratio^beta = 2 -> L = 4 * log 3 = 4.394449.
    log-ratio 0 -> L = 4 * log 2 = 2.772589. Chosen log-probs do not enter the loss.
    """
    hand = NPOLoss(beta=0.5)(torch.tensor([math.log(4.0) - 7.0, -3.0]), torch.tensor([-7.0, -3.0]))
    torch.testing.assert_close(hand.losses, torch.tensor([4.394449, 2.772589]), atol=1e-5, rtol=0)
    assert torch.isnan(hand.chosen_rewards).all()
    beta = 0.1
    pr = logps["policy_rejected_logps"].double()
    rr = logps["reference_rejected_logps"].double()
    expected = (2 / beta) * torch.log(1 + (torch.exp(pr) / torch.exp(rr)) ** beta)  # the paper's form, literally
    ours = NPOLoss(beta=beta)(
        logps["policy_rejected_logps"], logps["reference_rejected_logps"],
        logps["policy_chosen_logps"], logps["reference_chosen_logps"],
    )  # fmt: skip
    torch.testing.assert_close(ours.losses.double(), expected, atol=ATOL, rtol=0)
    chosen_ratio = logps["policy_chosen_logps"] - logps["reference_chosen_logps"]
    torch.testing.assert_close(ours.chosen_rewards, beta * chosen_ratio)


def _trl_reward_loss(trl, chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None) -> float:
    model = nn.Module().eval()
    model.forward = lambda **_: SimpleNamespace(logits=torch.cat([chosen, rejected])[:, None])  # (2B, 1)
    trainer = SimpleNamespace(
        model=model, args=SimpleNamespace(center_rewards_coefficient=None), accelerator=ACCELERATOR,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    inputs = {"attention_mask": torch.ones(2 * chosen.shape[0], 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    return float(trl.reward.RewardTrainer.compute_loss(trainer, model, inputs))


@pytest.mark.parametrize("with_margin", [False, True])
def test_bradley_terry_matches_trl(trl, with_margin):
    gen = torch.Generator().manual_seed(7)
    chosen, rejected = torch.randn(10, generator=gen) * 2, torch.randn(10, generator=gen) * 2
    margin = torch.rand(10, generator=gen) if with_margin else None
    ours = BradleyTerryLoss()(chosen, rejected, margin=margin)
    assert ours.weights is None
    for i in range(10):
        one_margin = None if margin is None else margin[i : i + 1]
        assert abs(ours.losses[i].item() - _trl_reward_loss(trl, chosen[i : i + 1], rejected[i : i + 1], one_margin)) < ATOL
    assert abs(ours.reduce().item() - _trl_reward_loss(trl, chosen, rejected, margin)) < ATOL
    torch.testing.assert_close(ours.chosen_rewards, chosen)


def test_bradley_terry_time_discount_hand_computed():
    """gamma = 0.5, T = 3, t = [2, 1, 0] -> w = [1, 0.5, 0.25], sum 1.75 -> [4/7, 2/7, 1/7].

    Scores r_w - r_l = 0 for all -> each unweighted loss is log 2 = 0.693147, so the weighted losses
    are [0.396084, 0.198042, 0.099021] and they sum to log 2.
    """
    out = BradleyTerryLoss(gamma=0.5)(torch.zeros(3), torch.zeros(3), time_steps=torch.tensor([2, 1, 0]), current_step=3)
    torch.testing.assert_close(out.weights, torch.tensor([4 / 7, 2 / 7, 1 / 7]))
    torch.testing.assert_close(out.losses, torch.tensor([0.396084, 0.198042, 0.099021]), atol=1e-6, rtol=0)
    assert abs(out.reduce().item() - math.log(2)) < 1e-6
    with pytest.raises(ValueError, match="no gamma"):
        BradleyTerryLoss()(torch.zeros(3), torch.zeros(3), time_steps=torch.tensor([2, 1, 0]), current_step=3)


def _dpo_inputs(logps) -> list[torch.Tensor]:
    return [logps[k] for k in ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")]


def test_ns_dpo_with_gamma_one_equals_dpo(logps):
    dpo = DPOLoss(beta=0.1)(*_dpo_inputs(logps))
    ns = NSDPOLoss(beta=0.1, gamma=1.0)(*_dpo_inputs(logps), time_steps=logps["time_steps"], current_step=10)
    torch.testing.assert_close(ns.reduce(), dpo.reduce(), atol=1e-7, rtol=0)
    torch.testing.assert_close(ns.losses * ns.losses.shape[0], dpo.losses, atol=1e-6, rtol=0)
    torch.testing.assert_close(ns.chosen_rewards, dpo.chosen_rewards, atol=0, rtol=0)
    torch.testing.assert_close(ns.rejected_rewards, dpo.rejected_rewards, atol=0, rtol=0)
    # Same gradient w.r.t. the policy log-probs, not just the same value.
    grads = []
    for loss in (DPOLoss(beta=0.1), NSDPOLoss(beta=0.1, gamma=1.0)):
        chosen = logps["policy_chosen_logps"].clone().requires_grad_()
        loss(chosen, *_dpo_inputs(logps)[1:]).reduce().backward()
        grads.append(chosen.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-8, rtol=1e-6)


def test_ns_dpo_weights_hand_computed(logps):
    """gamma = 0.9, T = 10: w_i = 0.9^(9 - t_i); losses = w_i * dpo_i / sum(w)."""
    t = logps["time_steps"]
    expected_w = torch.tensor([0.9 ** (9 - int(x)) for x in t])
    torch.testing.assert_close(time_discount_weights(t, 10, 0.9), expected_w)
    dpo = DPOLoss(beta=0.1)(*_dpo_inputs(logps))
    ns = NSDPOLoss(beta=0.1, gamma=0.9)(*_dpo_inputs(logps), time_steps=t, current_step=10)
    torch.testing.assert_close(ns.losses, expected_w * dpo.losses / expected_w.sum(), atol=1e-6, rtol=0)
    explicit = NSDPOLoss(beta=0.1, gamma=0.9)(*_dpo_inputs(logps), time_steps=t, current_step=10, weight_sum=2.0)
    torch.testing.assert_close(explicit.losses, expected_w * dpo.losses / 2.0, atol=1e-6, rtol=0)


def test_time_discount_rejects_future_steps_and_bad_gamma():
    with pytest.raises(ValueError, match=r"time_steps\[1\]=5 is not before current_step=5"):
        time_discount_weights(torch.tensor([1, 5]), 5, 0.9)
    with pytest.raises(ValueError, match="gamma must lie in"):
        NSDPOLoss(gamma=1.5)
    with pytest.raises(ValueError, match="current_step is required"):
        NSDPOLoss()(*[torch.zeros(2)] * 4, time_steps=torch.tensor([0, 1]))


def test_time_weight_keep_mask():
    """gamma = 0.5, T = 5, min_weight 0.25: ages 4-t = [4, 2, 0, 3] -> weights [1/16, 1/4, 1, 1/8]."""
    keep = time_weight_keep_mask(np.array([0, 2, 4, 1]), 5, 0.5, 0.25)
    assert keep.tolist() == [False, True, True, False]
    assert time_weight_keep_mask(np.array([0, 2]), 5, 0.5, 0.0).all()


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="policy_rejected_logps has 3 rows but policy_chosen_logps has 2"):
        DPOLoss()(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match=r"chosen_token_counts must be >= 1 \(row 1"):
        SimPOLoss()(torch.zeros(2) - 1, torch.zeros(2) - 1, torch.tensor([3, 0]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="IPO with ipo_length_normalize=True needs"):
        DPOLoss(loss_type="ipo")(*[torch.zeros(2)] * 4)
    with pytest.raises(ValueError, match="label_smoothing applies to loss_type='sigmoid' only"):
        DPOLoss(loss_type="hinge", label_smoothing=0.1)


def test_ns_dpo_global_normalisation_across_two_gloo_workers(logps, tmp_path):
    tensors = {k: v.clone() for k, v in logps.items()}
    torch.multiprocessing.spawn(ns_dpo_worker, args=(2, free_port(), tensors, str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    chosen = logps["policy_chosen_logps"].clone().requires_grad_()
    single = NSDPOLoss(beta=0.1, gamma=0.8)(chosen, *_dpo_inputs(logps)[1:], time_steps=logps["time_steps"], current_step=10)
    single.reduce().backward()
    torch.testing.assert_close(torch.cat([p["losses"] for p in parts]), single.losses.detach(), atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(torch.cat([p["weights"] for p in parts]), single.weights, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(torch.cat([p["grad"] for p in parts]), chosen.grad, atol=1e-8, rtol=1e-6)
    # Per-worker normalisation would differ, unless the halves happened to have equal weight sums.
    local = NSDPOLoss(beta=0.1, gamma=0.8)(*[t[:6] for t in _dpo_inputs(logps)], time_steps=logps["time_steps"][:6], current_step=10)
    assert not torch.allclose(local.losses, parts[0]["losses"])
