"""Training losses on unoriented normals.

:func:`unoriented_loss` is a plain mean over patches. The benchmark, though, scores each
cloud (a shape at a noise level) by the RMSE of its angles and averages those RMSEs.
:class:`GroupRMSELoss` follows that metric: its gradient is the gradient of the mean over
groups of ``sqrt(mean angle^2)``, so a large error (a normal at a crease) costs what it costs
in the benchmark, and a clean cloud's errors weigh as much as a noisy cloud's RMSE.
:func:`make_loss` gives any of them by name, with one call signature.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

LOSSES = ("rmse", "sin", "sin2", "sq")


def unoriented_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "sin") -> torch.Tensor:
    """Mean ``|sin|`` (``kind="sin"``), ``sin^2`` or squared angle in radians (``"sq"``: the
    benchmark's RMSE squared, pooled over the batch) of the unoriented angle; ``(B, 3)`` each.

    ``|sin|`` keeps a useful gradient for small errors (clean, sharp patches) where ``sin^2``
    lets the noisy patches dominate."""
    if kind == "sq":
        return unoriented_angle(pred, target).square().mean()
    t = target / target.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    s2 = (1 - (pred * t).sum(-1) ** 2).clamp_min(0)
    if kind == "sin2":
        return s2.mean()
    return (s2 + 1e-8).sqrt().mean()


def unoriented_angle(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Angle in radians ``(B,)`` between the lines of ``pred (B, 3)`` and ``target (B, 3)``
    (neither needs unit length): ``atan2(|p x t|, |p . t|)``, accurate near 0 and 90 degrees,
    with a finite gradient at 0."""
    if pred.shape != target.shape or pred.shape[-1:] != (3,) or pred.ndim != 2:
        raise ValueError(f"pred and target must be (B, 3), got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    cross = torch.linalg.cross(pred, target)  # (B, 3)
    sin = (cross.pow(2).sum(-1) + 1e-30).sqrt()
    return torch.atan2(sin, (pred * target).sum(-1).abs())


class GroupRMSELoss:
    """The benchmark's metric as a loss: the mean over groups ``g`` of ``RMSE_g``.

    Each patch carries the id of its group (in training: its shape and noise level). A batch
    holds a few patches of a group, too few for its RMSE, so ``RMSE_g`` is a running mean of
    the squared angles over batches (``decay`` per batch the group appears in), and the loss
    is ``sum_g mean_{i in g} theta_i^2 / (2 RMSE_g) / G`` over the ``G`` groups present: the
    gradient of ``mean_g RMSE_g``, with ``RMSE_g`` held fixed. Its value is about half the
    mean RMSE in radians. ``floor_deg`` bounds the weight of a group fitted almost exactly.
    """

    def __init__(self, groups: int, *, decay: float = 0.98, floor_deg: float = 0.5) -> None:
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.groups, self.decay = groups, decay
        self.floor = math.radians(floor_deg)
        self.mean_sq = torch.full((groups,), float("nan"), dtype=torch.float64)  # (G,)

    def __call__(self, pred: torch.Tensor, target: torch.Tensor,
                 group: torch.Tensor) -> torch.Tensor:
        """``pred (B, 3)``, ``target (B, 3)``, ``group (B,)`` ints in ``[0, groups)`` ->
        scalar loss."""
        theta2 = unoriented_angle(pred, target).pow(2)  # (B,)
        if group.shape != theta2.shape:
            raise ValueError(f"group must be (B,) = {tuple(theta2.shape)}, got "
                             f"{tuple(group.shape)}")
        group = group.to(theta2.device, torch.long)
        with torch.no_grad():
            if self.mean_sq.device != theta2.device:
                self.mean_sq = self.mean_sq.to(theta2.device)
            counts = torch.bincount(group, minlength=self.groups)  # (G,)
            if counts.numel() > self.groups:
                raise ValueError(f"group ids must be < {self.groups}")
            sums = torch.zeros_like(self.mean_sq).index_add_(0, group, theta2.double())
            present = counts > 0
            batch = sums / counts.clamp_min(1)
            old = self.mean_sq
            blended = torch.where(old.isnan(), batch, self.decay * old + (1 - self.decay) * batch)
            self.mean_sq = torch.where(present, blended, old)
            rmse = self.mean_sq.sqrt().clamp_min(self.floor)  # (G,)
            weight = 1.0 / (2 * rmse * counts.clamp_min(1) * present.sum())  # (G,)
        return (theta2 * weight[group].to(theta2.dtype)).sum()


def make_loss(kind: str, *, groups: int
              ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss ``(pred (B, 3), target (B, 3), group (B,)) -> scalar`` called
    ``kind`` (one of :data:`LOSSES`); ``groups``: how many group ids ``rmse`` tracks."""
    if kind not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {kind!r}")
    if kind == "rmse":
        return GroupRMSELoss(groups)
    return lambda pred, target, group: unoriented_loss(pred, target, kind)
