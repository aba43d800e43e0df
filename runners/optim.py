"""The recipe's optimizer and learning-rate schedule: which parameters decay, AdamW or SGD (fused),
warm-up then cosine, and a cosine per segment between a scheduler's rungs (`restart_factor`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from hybridnas.search_space.config import TrainConfig

# Parameter names that hold position tables (relative position biases, embeddings): no weight decay,
# as in Swin/ViT, even though they are 2-D.
NO_DECAY_NAME_PARTS = ("relative_position", "rel_pos", "pos_embed", "position_bias", "pos_bias", "pos_table")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and conv kernels only (ndim >= 2), never on norms, biases or
    position tables: decaying those only hurts (Loshchilov & Hutter; the Swin/ViT recipes)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(part in name for part in NO_DECAY_NAME_PARTS):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    # The fused kernels update all parameters in one pass (CPU and CUDA); same maths, less overhead.
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, fused=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=True)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up from ~0 to 1 over ``warmup`` steps, then cosine down to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def restart_factor(
    step: int, steps_per_epoch: int, epochs: int, warmup: int, restarts: Sequence[int]
) -> float:
    """`lr_factor` annealed to 0 at each epoch in ``restarts`` and started again from the peak
    (no second warm-up): one cosine per segment between rungs.

    With ``scheduler: moasha`` a trial's accuracy is compared at the rungs; a schedule that has
    annealed there ranks the space better than the same epochs inside a long schedule, and the
    accuracy at the end is the same within seed noise (measured: README, "Multi-fidelity search").
    """
    bounds = [
        0,
        *sorted(r * steps_per_epoch for r in set(restarts) if 0 < r < epochs),
        epochs * steps_per_epoch,
    ]
    for start, end in zip(bounds, bounds[1:]):
        if step < end:
            return lr_factor(step - start, end - start, warmup if start == 0 else 0)
    return 0.0
