"""The FA pipeline's per-point confidence, in [0, 1]: how far to trust each normal.

It is the product of two parts:

- the patch's own (:class:`fapc.models.normal_net.NormalNet`'s output): the frame elements'
  agreement on the weights, to the power 1/4, times the planarity of the weighted fit,
  ``(l1 - l0) / l1``;
- the neighbours' agreement (:func:`neighbour_agreement`), squared: how well the point's
  final normal agrees with its nearest points' normals.

Why these parts, measured on TRAIN shapes (`fapc/weights/EXPERIMENTS.md` gives the
figures): the frame agreement alone hardly ranks the errors (frames that disagree change
the network's weights, and the weighted fit absorbs most of that), planarity ranks them well
on clean data, and
the neighbours' agreement best under noise, where a wrong normal is one its neighbours do not
share. The frame agreement keeps a small weight: a patch whose frames disagree is still
flagged.
"""

from __future__ import annotations

import torch

FRAME_POWER = 0.25  # the frame agreement's exponent in the patch's own confidence
NEIGHBOUR_POWER = 2.0  # the neighbours' agreement's exponent in the final confidence


def patch_confidence(agreement: torch.Tensor, planarity: torch.Tensor) -> torch.Tensor:
    """``agreement (B,)``, ``planarity (B,)``, both in [0, 1] -> ``(B,)`` in [0, 1]."""
    if agreement.shape != planarity.shape:
        raise ValueError(f"agreement and planarity must have one shape, got "
                         f"{tuple(agreement.shape)} and {tuple(planarity.shape)}")
    return (agreement.clamp(0, 1) ** FRAME_POWER * planarity).clamp(0, 1)


def neighbour_agreement(own: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """How well each normal agrees with its neighbours' normals, up to sign: the mean of
    ``(n . n_j)^2`` over the neighbours, mapped so that 1 is full agreement and 0 is no
    better than normals spread evenly over the sphere (mean 1/3).

    Args:
        own: ``(Q, 3)`` unit normals.
        neighbours: ``(Q, K, 3)`` the neighbours' unit normals (zero rows are skipped:
            points without a normal).

    Returns:
        ``(Q,)`` in [0, 1]; 1 where a point has no neighbour with a normal.
    """
    if own.ndim != 2 or own.shape[1] != 3 or neighbours.ndim != 3 \
            or neighbours.shape[0] != own.shape[0] or neighbours.shape[2] != 3:
        raise ValueError(f"own must be (Q, 3) and neighbours (Q, K, 3), got "
                         f"{tuple(own.shape)} and {tuple(neighbours.shape)}")
    dots = (neighbours @ own.unsqueeze(2)).squeeze(2).square()  # (Q, K)
    has = neighbours.square().sum(2) > 0  # (Q, K)
    count = has.sum(1)
    mean = (dots * has).sum(1) / count.clamp_min(1)
    agree = ((mean - 1 / 3) * 1.5).clamp(0, 1)
    return torch.where(count > 0, agree, torch.ones_like(agree))


def final_confidence(patch: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """``patch (Q,)`` (:func:`patch_confidence`) and ``neighbours (Q,)``
    (:func:`neighbour_agreement`) -> the confidence ``(Q,)`` in [0, 1]."""
    return (patch * neighbours.clamp(0, 1) ** NEIGHBOUR_POWER).clamp(0, 1)
