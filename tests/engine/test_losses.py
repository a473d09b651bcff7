"""engine/losses.py: the losses against hand-computed values; `stage_loss` as the trainer and the held-out
evaluation use it."""

from __future__ import annotations

import math

import pytest
import torch

from fspo_engine.engine.config import load_config
from fspo_engine.engine.losses import (
    dpo_loss,
    ipo_loss,
    reward_metrics,
    sft_denominator,
    sft_loss,
    stage_loss,
)
from fspo_engine.engine.scoring import EpisodeLogprobs


def test_losses_against_hand_computed_values():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -3.0])
    # h = (pc - pr) - (rc - rr) = [1 - (-0.5), -3 - (-1)] = [1.5, -2.0]
    beta = 0.5
    assert math.isclose(ipo_loss(pc, pr, rc, rr, beta).item(), ((1.5 - 1.0) ** 2 + (-2.0 - 1.0) ** 2) / 2)
    sig = lambda x: 1 / (1 + math.exp(-x))
    expect = -(math.log(sig(0.75)) + math.log(sig(-1.0))) / 2
    assert math.isclose(dpo_loss(pc, pr, rc, rr, beta).item(), expect, rel_tol=1e-6)
    eps = 0.1
    smooth = -((1 - eps) * math.log(sig(0.75)) + eps * math.log(sig(-0.75))
               + (1 - eps) * math.log(sig(-1.0)) + eps * math.log(sig(1.0))) / 2
    assert math.isclose(dpo_loss(pc, pr, rc, rr, beta, eps).item(), smooth, rel_tol=1e-6)
    assert math.isclose(sft_loss(torch.tensor([-6.0, -2.0]), torch.tensor([3, 1])).item(), 2.0)
    # "sum": each response's summed NLL, averaged over responses (the released `-policy_chosen_logps`, .mean()).
    assert math.isclose(sft_loss(torch.tensor([-6.0, -2.0]), torch.tensor([3, 1]), "sum").item(), 4.0)
    m = reward_metrics(pc, pr, rc, rr, beta)
    assert math.isclose(m["rewards/chosen"], (0.5 * 0.5 + 0.5 * -1.0) / 2)
    assert m["rewards/accuracy"] == 0.5
    assert math.isclose(m["rewards/margin"], beta * (1.5 - 2.0) / 2)


def _pairs(chosen, rejected, chosen_tokens, rejected_tokens) -> EpisodeLogprobs:
    t = lambda x, dtype=torch.float64: torch.tensor(x, dtype=dtype)  # noqa: E731
    return EpisodeLogprobs(t(chosen), t(rejected), t(chosen_tokens, torch.long), t(rejected_tokens, torch.long),
                           list(range(len(chosen))))


@pytest.mark.parametrize("targets", ["chosen", "both"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_pref_ft_stage_loss_is_sft_loss_of_the_trained_responses_and_its_parts_sum_to_the_batch(targets, reduction):
    cfg = load_config(None, {"pref_ft.targets": targets, "pref_ft.reduction": reduction})
    batch = _pairs([-6.0, -2.0, -9.0], [-4.0, -8.0, -1.0], [3, 1, 4], [2, 5, 1])
    logp, tokens = batch.chosen, batch.chosen_tokens
    if targets == "both":
        logp, tokens = torch.cat([logp, batch.rejected]), torch.cat([tokens, batch.rejected_tokens])
    whole = stage_loss("pref-ft", cfg, batch)
    assert torch.equal(whole, sft_loss(logp, tokens, reduction))
    # Micro-batches (episode 0, episodes 1-2) with the batch's denominator sum to the batch's loss.
    denominator = sft_denominator(tokens, reduction)
    parts = [stage_loss("pref-ft", cfg, EpisodeLogprobs(*(x[s] for x in batch[:4]), []), denominator=denominator)
             for s in (slice(0, 1), slice(1, 3))]  # fmt: skip
    assert math.isclose(sum(p.item() for p in parts), whole.item(), rel_tol=1e-12)
    # A row of chosen responses only (pref_ft.targets = chosen packs no rejected branch).
    only_chosen = EpisodeLogprobs(batch.chosen, batch.chosen[:0], batch.chosen_tokens, batch.chosen_tokens[:0], [])
    if targets == "chosen":
        assert torch.equal(stage_loss("pref-ft", cfg, only_chosen), whole)


@pytest.mark.parametrize("length_normalize", [False, True])
def test_preference_stage_losses_are_ipo_and_dpo_against_the_reference(length_normalize):
    cfg = load_config(None, {"pref.beta": 0.5, "pref.label_smoothing": 0.1, "pref.length_normalize": length_normalize})
    policy = _pairs([-3.0, -5.0], [-4.0, -2.0], [2, 4], [1, 3])
    reference = policy._replace(chosen=torch.tensor([-3.5, -4.0], dtype=torch.float64),
                                rejected=torch.tensor([-3.0, -3.0], dtype=torch.float64))
    pc, pr, rc, rr = policy.chosen, policy.rejected, reference.chosen, reference.rejected
    if length_normalize:  # per-token means, the reference's divided by the same counts
        ct, rt = policy.chosen_tokens.double(), policy.rejected_tokens.double()
        pc, pr, rc, rr = pc / ct, pr / rt, rc / ct, rr / rt
    assert torch.equal(stage_loss("ipo", cfg, policy, reference), ipo_loss(pc, pr, rc, rr, 0.5))
    assert torch.equal(stage_loss("dpo", cfg, policy, reference), dpo_loss(pc, pr, rc, rr, 0.5, 0.1))
    with pytest.raises(ValueError, match="stage"):
        stage_loss("kto", cfg, policy, reference)
