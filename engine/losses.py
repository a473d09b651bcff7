"""FSPO losses: few-shot Pref-FT (SFT) and few-shot IPO / DPO.

All inputs are per-episode log-probabilities *summed* over response tokens (eos included), as in the
FSPO paper's code (built on the DPO reference implementation). Shapes: [E] for E episodes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sft_loss(logp: torch.Tensor, tokens: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Pref-FT: negative log-likelihood of the target responses given the few-shot context.

    logp [S] (each target response's summed log-prob), tokens [S] (its token count) -> scalar. S is one
    response per episode (`pref_ft.targets = chosen`) or two (`both`: chosen and rejected, as the released
    code's `sft_target.extend([chosen, rejected])`).
    - "mean": Σ NLL / Σ tokens, the NLL per token; long responses weigh by their length, as in SFT.
    - "sum": the mean over responses of each one's summed NLL, the released code's `-policy_chosen_logps`
      averaged over the batch. The same direction as "mean" within a batch, scaled by tokens per response.
    """
    if reduction == "mean":
        return -logp.sum() / tokens.sum().clamp_min(1)
    if reduction == "sum":
        return -logp.sum() / max(logp.numel(), 1)
    raise ValueError(f"reduction must be mean or sum, got {reduction!r}")


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


@torch.no_grad()
def reward_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> dict[str, float]:
    """Implicit rewards β(π − ref) for chosen and rejected, their accuracy (chosen > rejected) and margin."""
    rc = beta * (policy_chosen - ref_chosen)
    rr = beta * (policy_rejected - ref_rejected)
    return {
        "rewards/chosen": rc.mean().item(),
        "rewards/rejected": rr.mean().item(),
        "rewards/accuracy": (rc > rr).float().mean().item(),
        "rewards/margin": (rc - rr).mean().item(),
    }


def normalise_by_length(logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Length-normalised log-prob (the mean per token, TRL's `ipo` convention): logp [E] / tokens [E]."""
    return logp / tokens.clamp_min(1).to(logp.dtype)
