"""The metric-following training loss: angles, per-group RMSE gradient, running means."""

import math

import pytest
import torch

from fapc.losses import GroupRMSELoss, make_loss, unoriented_angle, unoriented_loss


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def test_unoriented_angle_ignores_sign_and_length_and_has_a_gradient_at_zero():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 3, dtype=torch.float64, generator=g)
    b = torch.randn(500, 3, dtype=torch.float64, generator=g)
    want = torch.arccos((_unit(a) * _unit(b)).sum(-1).abs())
    torch.testing.assert_close(unoriented_angle(a, b), want)
    torch.testing.assert_close(unoriented_angle(-3 * a, 0.5 * b), want)
    assert float(unoriented_angle(a, b).max()) <= math.pi / 2 + 1e-12
    same = a[:4].clone().requires_grad_(True)
    unoriented_angle(same, a[:4].detach()).pow(2).sum().backward()
    assert torch.isfinite(same.grad).all()
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        unoriented_angle(a[:, :2], b[:, :2])


def test_sq_loss_is_the_mean_squared_unoriented_angle_by_name_too():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(200, 3, dtype=torch.float64, generator=g)
    b = _unit(torch.randn(200, 3, dtype=torch.float64, generator=g))
    want = torch.arccos((_unit(a) * b).sum(-1).abs()).square().mean()
    torch.testing.assert_close(unoriented_loss(a, b, "sq"), want)
    torch.testing.assert_close(unoriented_loss(-a, b, "sq"), want)
    torch.testing.assert_close(make_loss("sq", groups=1)(a, b, torch.zeros(200)), want)


def test_group_loss_gradient_is_that_of_the_mean_per_group_rmse():
    g = torch.Generator().manual_seed(1)
    target = _unit(torch.randn(60, 3, dtype=torch.float64, generator=g))
    # three groups with very different errors: small, medium, large
    scale = torch.tensor([0.02, 0.2, 1.0], dtype=torch.float64).repeat_interleave(20)
    group = torch.arange(3).repeat_interleave(20)
    pred = (target + scale[:, None] * torch.randn(60, 3, dtype=torch.float64, generator=g))
    p1 = pred.clone().requires_grad_(True)
    GroupRMSELoss(3)(p1, target, group).backward()  # first batch: running means = batch means
    p2 = pred.clone().requires_grad_(True)
    theta2 = unoriented_angle(p2, target).pow(2)
    metric = torch.stack([theta2[group == k].mean().sqrt() for k in range(3)]).mean()
    metric.backward()
    torch.testing.assert_close(p1.grad, p2.grad)
    # a plain mean of squared angles would let the noisy group rule; this one does not:
    # per patch, the clean group's gradient is larger than under a pooled mean
    p3 = pred.clone().requires_grad_(True)
    theta2_3 = unoriented_angle(p3, target).pow(2)
    theta2_3.mean().backward()
    ratio = p1.grad[:20].norm() / p3.grad[:20].norm()
    assert ratio > 5 * p1.grad[40:].norm() / p3.grad[40:].norm()


def test_group_loss_keeps_running_means_of_the_groups_it_sees():
    loss = GroupRMSELoss(4, decay=0.5)
    t = torch.tensor([[0.0, 0.0, 1.0]] * 2)
    tilt = math.radians(10)
    p = torch.tensor([[math.sin(tilt), 0.0, math.cos(tilt)]] * 2)
    loss(p, t, torch.tensor([1, 1]))
    assert math.isclose(float(loss.mean_sq[1]), tilt ** 2, rel_tol=1e-5)
    assert torch.isnan(loss.mean_sq[[0, 2, 3]]).all()  # groups not seen yet stay unknown
    loss(t, t, torch.tensor([1, 1]))  # an exact batch halves the running mean (decay 0.5)
    assert math.isclose(float(loss.mean_sq[1]), tilt ** 2 / 2, rel_tol=1e-5)
    with pytest.raises(ValueError, match="< 4"):
        loss(p, t, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="groups"):
        GroupRMSELoss(0)
