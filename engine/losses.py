"""FSPO losses: few-shot Pref-FT (SFT) and few-shot IPO / DPO.

All inputs are per-episode log-probabilities *summed* over response tokens (eos included), as in the
FSPO paper's code (built on the DPO reference implementation). Shapes: [E] for E episodes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sft_loss(chosen_logp: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Pref-FT: mean negative log-likelihood per chosen-response token.

    chosen_logp [E] (sum over each response's tokens), chosen_tokens [E] (token counts) -> scalar.
    Token-weighted (sum of NLL / number of tokens), so long responses weigh by their length, as in SFT.
    """
    return -chosen_logp.sum() / chosen_tokens.sum().clamp_min(1)


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
