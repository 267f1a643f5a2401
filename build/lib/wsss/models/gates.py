"""Hard Concrete gates for L0-regularised attention-head pruning (Louizos et al., 2018)."""

from __future__ import annotations

import math

import torch
from torch import nn


class HardConcreteGate(nn.Module):
    """One stochastic gate per attention head.

    Training samples ``g = clamp(sigmoid((log u - log(1-u) + log_alpha) / beta) * (zeta - gamma) + gamma, 0, 1)``;
    evaluation uses the deterministic gate ``g = 1[log_alpha > 0]`` (a head is either open or closed, as in
    the reference). While ``active`` is False (the warm-up before pruning starts) every gate is 1.

    Args:
        num_heads: Number of heads (gates).
        init: Initial ``log_alpha``; positive values start with open gates.
        beta: Temperature of the concrete distribution.
        gamma: Lower end of the stretch interval (< 0).
        zeta: Upper end of the stretch interval (> 1).
    """

    def __init__(
        self, num_heads: int, init: float = 3.0, beta: float = 0.33, gamma: float = -0.1, zeta: float = 1.1
    ) -> None:
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full((num_heads,), float(init)))
        self.beta = beta
        self.gamma = gamma
        self.zeta = zeta
        self.active = True

    def forward(self) -> torch.Tensor:
        """Returns the gate value of every head, shape ``[num_heads]``."""
        if not self.training:
            return self.open_mask().to(self.log_alpha.dtype)
        if not self.active:
            return torch.ones_like(self.log_alpha)
        u = torch.rand_like(self.log_alpha).clamp(1e-6, 1.0 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def open_mask(self) -> torch.Tensor:
        """Deterministic gates: True where a head is open."""
        return self.log_alpha.detach() > 0

    def open_probability(self) -> torch.Tensor:
        """``P(g != 0)`` per head: the expected L0 norm, i.e. the penalty of each gate."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta))
