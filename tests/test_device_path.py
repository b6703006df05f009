"""The GPU pipeline (torch grid kNN + patches on the device), run on the CPU, against the CPU
pipeline (scipy kNN); and the same on CUDA where present."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import angle_deg
from scipy.spatial import cKDTree

from fapc.bench import synthetic_surface
from fapc.knn_torch import GridKNN
from fapc.models.normal_net import NormalNet, NormalNetConfig
from fapc.normals import estimate_normals

CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device")])
DEVICES = ["cpu", CUDA]


def _lidar_like(n: int, seed: int = 0) -> np.ndarray:
    """A dense surface plus a 25x sparser copy and a few far points: density varies a lot."""
    p = synthetic_surface(n, seed=seed, noise=1e-3)
    return np.concatenate([p, p[: n // 10] * 5 + 10, p[:50] * 100])


@pytest.mark.parametrize("device", DEVICES)
def test_grid_knn_is_exact(device):
    p = _lidar_like(6000)
    g = GridKNN(torch.from_numpy(p).to(device), 16)
    idx, dist = g.query(torch.from_numpy(p).to(device), 16)
    ref_d, ref_i = cKDTree(p).query(p, 16)
    np.testing.assert_allclose(dist.cpu().numpy(), ref_d, atol=1e-9)
    assert (idx.cpu().numpy() == ref_i).mean() > 0.9999  # only exact ties may differ


def test_grid_knn_stays_exact_when_dense_spots_split_the_queries(monkeypatch):
    import fapc.knn_torch as knn_torch

    monkeypatch.setattr(knn_torch, "ROW_BUDGET", 64 * 40)  # forces many halvings
    p = _lidar_like(3000, seed=1)
    idx, dist = GridKNN(torch.from_numpy(p), 24).query(torch.from_numpy(p), 24)
    ref_d, _ = cKDTree(p).query(p, 24)
    np.testing.assert_allclose(dist.numpy(), ref_d, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(p[idx.numpy()] - p[:, None], axis=2), ref_d,
                               atol=1e-9)


@pytest.mark.parametrize("options", [{}, {"far_smooth": 1},
                                     {"far_smooth": 1, "k_ext": 8, "refine": 1},
                                     {"far_smooth": 1, "refine": 1, "wide_stride": 8}])
@pytest.mark.parametrize("device", DEVICES)
def test_device_pipeline_matches_cpu_pipeline(device, options):
    torch.manual_seed(0)
    model = NormalNet(NormalNetConfig(k_near=16, k_far=16, far_stride=4, **options)).eval()
    if options.get("k_ext"):
        with torch.no_grad():  # the outer ring fully in the fit
            model.ring_bias.fill_(3.0)
    if options.get("wide_stride"):
        with torch.no_grad():  # the wide summary weighing as much as the patch
            model.wide_log_weight.fill_(2.0)
    pts = synthetic_surface(5000, seed=2, noise=2e-3)
    ref = estimate_normals(pts, method="fa", model=model, device="cpu", knn="scipy")
    got = estimate_normals(pts, method="fa", model=model, device=device, knn="torch")
    err = angle_deg(ref.normals, got.normals)
    assert np.mean(err < 0.1) >= 0.999, np.sort(err)[-10:]
    np.testing.assert_allclose(ref.curvature, got.curvature, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_device_pipeline_matches_cpu_pipeline_with_draws(device):
    torch.manual_seed(0)
    model = NormalNet(NormalNetConfig(k_near=16, k_far=16, far_stride=4, far_smooth=1)).eval()
    pts = synthetic_surface(4000, seed=3, noise=5e-3)
    ref = estimate_normals(pts, method="fa", model=model, device="cpu", knn="scipy", draws=2)
    got = estimate_normals(pts, method="fa", model=model, device=device, knn="torch", draws=2)
    one = estimate_normals(pts, method="fa", model=model, device=device, knn="torch", draws=1)
    err = angle_deg(ref.normals, got.normals)
    assert np.mean(err < 0.1) >= 0.999, np.sort(err)[-10:]
    assert angle_deg(one.normals, got.normals).max() > 0.01  # the second draw counts


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_network_moves_few_normals_and_little(device):
    # the shipped model; bf16 autocast covers the widest layer only, frames and fits are float32+
    pts = synthetic_surface(30_000, seed=3, noise=2e-3)
    qi = np.arange(0, len(pts), 10)
    f32 = estimate_normals(pts, device=device, precision="float32", query_index=qi).normals
    auto = estimate_normals(pts, device=device, query_index=qi).normals
    b16 = estimate_normals(pts, device=device, precision="bf16", query_index=qi).normals
    assert np.array_equal(f32, auto)  # auto is float32
    err = angle_deg(f32, b16)
    assert 0 < err.max() < 0.5 and np.mean(err < 0.1) >= 0.99, np.quantile(err, [0.5, 0.999])


def test_precision_is_checked():
    with pytest.raises(ValueError, match="precision"):
        estimate_normals(synthetic_surface(200, seed=0), precision="fp8")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_graph_replay_gives_the_eager_outputs():
    from fapc.cuda_graphs import GraphedForward
    from fapc.models.checkpoint import load_model
    from fapc.runtime import configure_precision

    dev = torch.device("cuda")
    net, _ = load_model(None, device=dev)
    configure_precision(net, dev, "float32")
    g = torch.Generator().manual_seed(0)
    patches = torch.randn(700, net.config.patch.size, 3, generator=g)  # 2 full replays + a tail
    patches[..., 2] *= 0.05  # roughly planar, as real patches are
    patches = patches.to(dev)
    with torch.inference_mode():
        eager = net(patches)
        graphed = GraphedForward(net, size=patches.shape[1], dtype=patches.dtype, device=dev,
                                 batch=256)(patches)
    assert graphed["normal"].shape == eager["normal"].shape
    err = angle_deg(eager["normal"].cpu().numpy(), graphed["normal"].cpu().numpy())
    # the same kernels, but cuBLAS may pick another algorithm for another batch length: the
    # project's CUDA-vs-CPU standard (0.1 degree on 99.9 % of points) applies
    assert np.mean(err < 0.1) >= 0.999, np.sort(err)[-5:]
    assert np.median(err) < 1e-3
    torch.testing.assert_close(graphed["curvature"], eager["curvature"], atol=1e-3, rtol=1e-3)


def test_grid_knn_is_exact_on_a_lattice():
    # grid-sampled data (CAD): points exactly on cell faces (margin 0) and many exact ties;
    # the distances must still be the true k nearest
    g = np.arange(12, dtype=np.float64)
    p = np.stack(np.meshgrid(g, g, g[:4], indexing="ij"), -1).reshape(-1, 3) * 0.25
    for cell in (None, 0.25, 0.5):
        idx, dist = GridKNN(torch.from_numpy(p), 20, cell=cell).query(torch.from_numpy(p), 20)
        ref_d, _ = cKDTree(p).query(p, 20)
        np.testing.assert_allclose(dist.numpy(), ref_d, atol=1e-12)
        np.testing.assert_allclose(np.linalg.norm(p[idx.numpy()] - p[:, None], axis=2), ref_d,
                                   atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_device_pipeline_matches_cpu_pipeline_on_a_heavily_noisy_cloud(device):
    """The shipped pipeline where the cloud reads heavy: several draws, and the learned
    smoothing with the package's heavy-noise weights (face features and context, where it
    holds them), through the device path as through the scipy one."""
    from fapc.models.checkpoint import CONSENSUS_MODEL, HEAVY_CONSENSUS_MODEL
    from fapc.noise import noise_figure

    pts = synthetic_surface(6000, seed=4, noise=5e-2)
    assert noise_figure(pts).level == "heavy"
    q = np.arange(0, len(pts), 5)
    ref = estimate_normals(pts, device="cpu", knn="scipy", query_index=q)
    got = estimate_normals(pts, device=device, knn="torch", query_index=q)
    err = angle_deg(ref.normals, got.normals)
    assert np.mean(err < 0.1) >= 0.999, np.sort(err)[-10:]
    if HEAVY_CONSENSUS_MODEL.exists():  # those weights ran: the default ones give otherwise
        plain = estimate_normals(pts, device=device, knn="torch", query_index=q,
                                 consensus_model=CONSENSUS_MODEL)
        assert angle_deg(plain.normals, got.normals).max() > 0.1
