"""Frame averaging: exact invariance/equivariance in float64 for every backbone and group,
the same backbones failing without FA, SO(3) models not reflection-equivariant, and no
cancellation of unoriented axes."""

from __future__ import annotations

import pytest
import torch

from fapc.frames import compute_frames, frame_stability, sign_flips, to_frames
from fapc.models import DGCNN, FrameAveraging, PointNet
from fapc.models.fa import average_axes
from fapc.testing import equivariance_error, random_rotation

GROUPS = ["O3", "SO3", "E3", "SE3"]


def _points(b=3, n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    # anisotropic blobs: well-separated eigenvalues, so the frames are stable
    return torch.randn(b, n, 3, generator=g, dtype=torch.float64) * torch.tensor(
        [3.0, 1.5, 0.5], dtype=torch.float64) + 2.0


def _backbone(kind: str, out_dim: int, per_point: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "pointnet":
        net = PointNet(widths=(32, 64), head=(32,), out_dim=out_dim, per_point=per_point)
    else:
        net = DGCNN(k=8, widths=(16, 32), emb=64, head=(32,), out_dim=out_dim, per_point=per_point)
    return net.double().eval()


CASES = [(kind, output, per_point) for kind in ("pointnet", "dgcnn")
         for output in ("invariant", "equivariant", "axis") for per_point in (False, True)]


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("kind,output,per_point", CASES)
def test_fa_is_exactly_equivariant_and_plain_backbone_is_not(group, kind, output, per_point):
    pts = _points()
    out_dim = 4 if output == "invariant" else 3
    net = _backbone(kind, out_dim, per_point)
    fa = FrameAveraging(net, group=group, output=output).eval()
    with torch.no_grad():
        err = equivariance_error(fa, pts, group=group, output=output, per_point=per_point,
                                 trials=6, seed=1)
        assert err["worst"] < 1e-9, err
        plain = equivariance_error(net, pts, group=group, output=output, per_point=per_point,
                                   trials=6, seed=1)
    assert plain["worst"] > 1e-3, plain  # the same test fails without FA


@pytest.mark.parametrize("group", ["SO3", "SE3"])
def test_rotation_groups_are_not_reflection_equivariant(group):
    pts = _points()
    fa = FrameAveraging(_backbone("pointnet", 3, False), group=group, output="equivariant").eval()
    with torch.no_grad():
        rot = equivariance_error(fa, pts, group=group, output="equivariant", reflections=False)
        refl = equivariance_error(fa, pts, group=group, output="equivariant", reflections=True,
                                  trials=8)
    assert rot["worst"] < 1e-9
    assert refl["worst"] > 1e-3  # odd trials are reflections: a SO(3) model does not follow them


def test_frame_sizes_and_determinants():
    pts = _points()
    for group, size in [("O3", 8), ("E3", 8), ("SO3", 4), ("SE3", 4)]:
        fr = compute_frames(pts, group=group)
        assert fr.rotations.shape == (3, size, 3, 3)
        det = torch.linalg.det(fr.rotations)
        if size == 4:
            assert torch.allclose(det, torch.ones_like(det))
        else:
            assert (det > 0).sum() == 12 and (det < 0).sum() == 12
        eye = torch.eye(3, dtype=torch.float64)
        assert torch.allclose(fr.rotations.transpose(-1, -2) @ fr.rotations, eye.expand_as(
            fr.rotations), atol=1e-12)
    assert sign_flips("SO3").prod(1).eq(1).all()


def test_masked_ragged_sets_ignore_padding():
    pts = _points(b=2, n=40)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 25:] = False
    padded = pts.clone()
    padded[1, 25:] = 1e3  # garbage in the padding must not matter
    net = _backbone("pointnet", 4, False)
    fa = FrameAveraging(net, group="E3").eval()
    with torch.no_grad():
        a = fa(padded, mask)[1]
        b = fa(pts[1:2, :25])[0]
    assert torch.allclose(a, b, atol=1e-10)


def test_stochastic_fa_uses_one_element_in_training():
    pts = _points()
    fa = FrameAveraging(_backbone("pointnet", 3, False), group="E3", output="equivariant",
                        stochastic=True)
    fa.train()
    out, frames = fa.per_frame(pts)
    assert out.shape == (3, 1, 3) and frames.size == 1
    fa.eval()
    out, frames = fa.per_frame(pts)
    assert out.shape == (3, 8, 3)


def _symmetric_planar_patch() -> torch.Tensor:
    """A rectangular grid (z = 0) symmetric under every sign flip of its own frame, posed
    randomly: every frame element sees the same local points."""
    xs = torch.linspace(-2, 2, 9, dtype=torch.float64)
    ys = torch.linspace(-1, 1, 5, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, ys, indexing="ij")
    grid = torch.stack([gx.flatten(), gy.flatten(), torch.zeros(45, dtype=torch.float64)], -1)
    q = random_rotation(torch.Generator().manual_seed(3))
    return (grid @ q.T).unsqueeze(0)


def test_plain_vector_averaging_cancels_but_axis_averaging_does_not():
    patch = _symmetric_planar_patch()
    net = _backbone("pointnet", 3, False)
    with torch.no_grad():
        vec = FrameAveraging(net, group="O3", output="equivariant").eval()(patch)
        axis = FrameAveraging(net, group="O3", output="axis").eval()(patch)
    assert vec.norm() < 1e-9  # n and -n cancel: the trap
    assert torch.isfinite(axis).all() and abs(axis.norm().item() - 1) < 1e-12


def test_axis_output_is_a_finite_unit_vector_on_1000_random_patches():
    g = torch.Generator().manual_seed(7)
    scale = torch.rand(1000, 1, 3, generator=g, dtype=torch.float64) * torch.tensor(
        [1.0, 1.0, 0.05], dtype=torch.float64)
    patches = torch.randn(1000, 32, 3, generator=g, dtype=torch.float64) * scale
    patches[:10] = 0  # fully degenerate patches too
    patches[10:20, :, 2] = 0  # exactly planar
    net = _backbone("pointnet", 3, False)
    fa = FrameAveraging(net, group="SO3", output="axis").eval()
    with torch.no_grad():
        axis = fa(patches)
    assert torch.isfinite(axis).all()
    assert torch.allclose(axis.norm(dim=-1), torch.ones(1000, dtype=torch.float64), atol=1e-9)
    agree = fa.last_agreement
    assert (agree >= 1 / 3 - 1e-9).all() and (agree <= 1 + 1e-9).all()


def test_average_axes_ignores_signs():
    v = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [0.0, 0.01, 1.0]]], dtype=torch.float64)
    axis, agree = average_axes(v, dim=1)
    assert abs(abs(axis[0, 2].item()) - 1) < 1e-4 and agree.item() > 0.99


def test_frame_stability_flags_degenerate_sets():
    vals = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 2.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    s = frame_stability(vals)
    assert s[0] == 0 and s[2] == 0 and s[1] == 0.5


def test_to_frames_round_trip():
    pts = _points()
    fr = compute_frames(pts, group="E3")
    local = to_frames(pts, fr)  # (B, F, N, 3)
    back = local @ fr.rotations.transpose(-1, -2) + fr.translation[:, None, None, :]
    assert torch.allclose(back, pts.unsqueeze(1).expand_as(back), atol=1e-12)
