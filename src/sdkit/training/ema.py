"""Exponential moving average of model weights (Polyak & Juditsky 1992; as in DDPM, Ho et al. 2020)."""

from __future__ import annotations

import torch
from torch import nn


def ema_decay(step, decay, warmup=True):
    """Decay used at optimizer step ``step`` (1-based): min(decay, (1 + step) / (10 + step)) with warm-up.

    The warm-up keeps the average from being dominated by the random initial weights in short runs.
    """
    if not warmup:
        return decay
    return min(decay, (1 + step) / (10 + step))


class EMA:
    """Shadow copies of a module's trainable parameters: shadow = d * shadow + (1 - d) * param.

    Frozen parameters (``requires_grad=False``) are not averaged, so they stay bit-exact.
    """

    def __init__(self, module: nn.Module, decay: float = 0.999, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.shadow = {k: p.detach().clone() for k, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        d = ema_decay(step, self.decay, self.warmup)
        for name, p in module.named_parameters():
            if name in self.shadow:
                self.shadow[name].mul_(d).add_(p.detach(), alpha=1 - d)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the averaged weights into ``module`` (e.g. a copy used for sampling or export)."""
        params = dict(module.named_parameters())
        for name, value in self.shadow.items():
            params[name].copy_(value)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not match the model: differing names {sorted(missing)[:5]}")
        self.decay, self.warmup = state["decay"], state["warmup"]
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
