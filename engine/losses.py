"""FSPO losses: few-shot Pref-FT (SFT) and few-shot IPO / DPO.

All inputs are per-episode log-probabilities *summed* over response tokens (eos included), as in the
FSPO paper's code (built on the DPO reference implementation). Shapes: [E] for E episodes.

`stage_loss` is the loss a training stage optimises, as the config says; the trainer (on each micro-batch)
and the held-out evaluation (on the held-out episodes) both call it.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from fspo_engine.engine.config import TrainConfig


class PairLogprobs(Protocol):
    """Per-episode log-prob sums and token counts ([E] each), as `scoring.EpisodeLogprobs` holds them.
    `rejected` and `rejected_tokens` may be empty for Pref-FT on the chosen responses only."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


def sft_denominator(tokens: torch.Tensor, reduction: str = "mean") -> torch.Tensor | int:
    """What `sft_loss` divides the summed NLL by, for responses of `tokens` [S] tokens each: their token count
    ("mean", at least 1) or their number ("sum", at least 1)."""
    if reduction == "mean":
        return tokens.sum().clamp_min(1)
    if reduction == "sum":
        return max(tokens.numel(), 1)
    raise ValueError(f"reduction must be mean or sum, got {reduction!r}")


def sft_loss(logp: torch.Tensor, tokens: torch.Tensor, reduction: str = "mean",
             denominator: torch.Tensor | int | None = None) -> torch.Tensor:
    """Pref-FT: negative log-likelihood of the target responses given the few-shot context.

    logp [S] (each target response's summed log-prob), tokens [S] (its token count) -> scalar. S is one
    response per episode (`pref_ft.targets = chosen`) or two (`both`: chosen and rejected, as the released
    code's `sft_target.extend([chosen, rejected])`).
    - "mean": Σ NLL / Σ tokens, the NLL per token; long responses weigh by their length, as in SFT.
    - "sum": the mean over responses of each one's summed NLL, the released code's `-policy_chosen_logps`
      averaged over the batch. The same direction as "mean" within a batch, scaled by tokens per response.

    denominator: for a micro-batch of a larger batch, the whole batch's `sft_denominator`, so that the
    micro-batches' losses sum to the batch's loss; default: these responses' own.
    """
    if denominator is None:
        denominator = sft_denominator(tokens, reduction)
    return -logp.sum() / denominator


def preference_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> torch.Tensor:
    """h = (π_c − π_r) − (ref_c − ref_r): the implicit-reward margin before β. All [E] -> [E]."""
    return (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)


def ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17): mean over episodes of (h − 1/(2β))². [E] x 4 -> scalar."""
    h = preference_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return ((h - 1.0 / (2.0 * beta)) ** 2).mean()


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float,
             label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023): −log σ(βh), with conservative label smoothing ε (Mitchell 2023):
    −(1−ε) log σ(βh) − ε log σ(−βh). [E] x 4 -> scalar."""
    h = preference_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses.mean()


def preference_inputs(policy: PairLogprobs, reference: PairLogprobs,
                      length_normalize: bool) -> tuple[torch.Tensor, ...]:
    """(π_c, π_r, ref_c, ref_r) [E] each, as IPO/DPO and the rewards take them: sums, or with `length_normalize`
    (pref.length_normalize) means per response token."""
    pc, pr, rc, rr = policy.chosen, policy.rejected, reference.chosen, reference.rejected
    if length_normalize:
        ct, rt = policy.chosen_tokens.to(pc.device), policy.rejected_tokens.to(pc.device)
        pc, pr = normalise_by_length(pc, ct), normalise_by_length(pr, rt)
        rc, rr = normalise_by_length(rc, ct), normalise_by_length(rr, rt)
    return pc, pr, rc, rr


def stage_loss(stage: str, cfg: TrainConfig, policy: PairLogprobs, reference: PairLogprobs | None = None, *,
               denominator: torch.Tensor | int | None = None) -> torch.Tensor:
    """The loss of training stage `stage` on these episodes -> scalar.

    "pref-ft": `sft_loss` of the trained responses (pref_ft.targets: the chosen ones, or chosen and rejected),
    with pref_ft.reduction; `denominator` as `sft_loss`'s (the batch's, for a micro-batch's part of it).
    "ipo" / "dpo": `ipo_loss` / `dpo_loss` (pref.beta, pref.label_smoothing) against `reference`, on sums or,
    with pref.length_normalize, per-token means; the mean over these episodes.
    """
    if stage == "pref-ft":
        logp, tokens = policy.chosen, policy.chosen_tokens
        if cfg.pref_ft.targets == "both":
            logp, tokens = torch.cat([logp, policy.rejected]), torch.cat([tokens, policy.rejected_tokens])
        return sft_loss(logp, tokens, cfg.pref_ft.reduction, denominator)
    pc, pr, rc, rr = preference_inputs(policy, reference, cfg.pref.length_normalize)
    if stage == "ipo":  # the stage names its loss (pref.loss only picks the stage of --stage all)
        return ipo_loss(pc, pr, rc, rr, cfg.pref.beta)
    if stage == "dpo":
        return dpo_loss(pc, pr, rc, rr, cfg.pref.beta, cfg.pref.label_smoothing)
    raise ValueError(f"stage must be pref-ft, ipo or dpo, got {stage!r}")


@torch.no_grad()
def reward_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> dict[str, torch.Tensor]:
    """Implicit rewards β(π − ref) for chosen and rejected, their accuracy (chosen > rejected) and margin, as
    0-d tensors on the inputs' device (the trainer reads a step's metrics from the device at once)."""
    rc = beta * (policy_chosen - ref_chosen)
    rr = beta * (policy_rejected - ref_rejected)
    return {
        "rewards/chosen": rc.mean(),
        "rewards/rejected": rr.mean(),
        "rewards/accuracy": (rc > rr).float().mean(),
        "rewards/margin": (rc - rr).mean(),
    }


def normalise_by_length(logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Length-normalised log-prob (the mean per token, TRL's `ipo` convention): logp [E] / tokens [E]."""
    return logp / tokens.clamp_min(1).to(logp.dtype)
