"""Optimizer helpers both training stages use: the warm-up (`ospo.sft.SFTModule`) and RL
(`ospo.module.RLModule`, the benchmarks' plain loop)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ospo.policy import Policy


def optimization(policy: Policy, optimizer: Callable, scheduler: Callable) -> dict[str, Any]:
    """The optimizer over the policy's trainable parameters and its LR schedule, stepped once
    per update, from the config's `_partial_` factories (`rl.optimizer`, `rl.scheduler`; the
    warm-up's `sft.*`), in the form Lightning's `configure_optimizers` returns."""
    opt = optimizer(policy.trainable_parameters())
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler(opt), "interval": "step"}}


def clip_grad_norm(max_norm: float) -> Callable[[torch.optim.Optimizer], None]:
    """Clip the global gradient norm of the optimizer's parameters to `max_norm`."""

    def clip(optimizer: torch.optim.Optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_norm)

    return clip
