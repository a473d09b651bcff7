"""The optimizer and its learning-rate schedule (set by the stage loop before every step)."""

from __future__ import annotations

import math

import torch

from fspo_engine.engine.config import TrainConfig


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """optim.name: AdamW, no weight decay on norms (1-D params), fused on CUDA, foreach elsewhere; or RMSprop
    as the released FSPO recipe builds it (`torch.optim.RMSprop(params, lr)`: torch's defaults, no momentum,
    no weight decay), with optim.alpha and optim.eps."""
    decay, no_decay = [], []
    for _, p in sorted(model.named_parameters()):
        if p.requires_grad:
            (no_decay if p.dim() < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    on_cuda = next(model.parameters()).is_cuda
    if cfg.optim.name == "rmsprop":  # config validation keeps weight_decay at 0 here
        return torch.optim.RMSprop(groups, lr=cfg.optim.lr, alpha=cfg.optim.alpha, eps=cfg.optim.eps,
                                   foreach=None if on_cuda else True)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                             eps=cfg.optim.eps, fused=on_cuda or None, foreach=None if on_cuda else True)


def lr_at(step: int, total: int, peak: float, warmup: int, schedule: str, min_ratio: float) -> float:
    """Linear warmup to `peak`, then cosine/linear decay to peak * min_ratio (or constant). step is 0-based."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return peak * (min_ratio + (1 - min_ratio) * decay)
