"""The Jacobi 3x3 eigensolver against torch.linalg.eigh on the CPU."""

from __future__ import annotations

import pytest
import torch

from fapc.eigen import sym3_eigh

CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device")])
DEVICES = ["cpu", CUDA]


def _cases(dtype, n=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 3, 3, generator=g, dtype=dtype)
    out = {"random": a + a.transpose(-1, -2), "psd": a @ a.transpose(-1, -2) * 1e-6}
    x = torch.randn(n, 3, generator=g, dtype=dtype)
    out["rank1"] = x[:, :, None] * x[:, None, :]
    y = torch.randn(n, 3, generator=g, dtype=dtype)
    out["rank2"] = out["rank1"] + y[:, :, None] * y[:, None, :]
    q, _ = torch.linalg.qr(torch.randn(n, 3, 3, generator=g, dtype=dtype))
    for name, lam in {"repeated": [1.0, 1.0, 3.0], "triple": [2.0, 2.0, 2.0],
                      "near": [1.0, 1.0 + 1e-7, 5.0], "huge": [1e8, 2e8, 3e8],
                      "tiny": [1e-20, 3e-20, 4e-20]}.items():
        d = torch.diag_embed(torch.tensor(lam, dtype=dtype).expand(n, 3))
        out[name] = q @ d @ q.transpose(-1, -2)
    out["zero"] = torch.zeros(n, 3, 3, dtype=dtype)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_reconstruction_and_values(device, dtype, tol):
    for name, m in _cases(dtype).items():
        md = m.to(device)
        w, v = sym3_eigh(md)
        w, v = w.cpu(), v.cpu()
        rec = v @ torch.diag_embed(w) @ v.transpose(-1, -2)
        scale = m.norm(dim=(-1, -2)).clamp_min(torch.finfo(dtype).tiny)
        err = ((rec - m).norm(dim=(-1, -2)) / scale).max().item()
        assert err < tol or m.abs().max() == 0, (name, err)
        ref = torch.linalg.eigvalsh(m)
        assert ((w - ref).abs() / scale[:, None]).max() < tol, name
        assert (w[:, 1:] >= w[:, :-1]).all(), name  # ascending
        eye = torch.eye(3, dtype=dtype)
        assert (v.transpose(-1, -2) @ v - eye).abs().max() < 10 * tol, name
        assert torch.allclose(torch.linalg.det(v), torch.ones(len(v), dtype=dtype),
                              atol=10 * tol), name


def test_batch_shapes_and_validation():
    m = torch.eye(3).expand(4, 5, 3, 3).contiguous()
    w, v = sym3_eigh(m)
    assert w.shape == (4, 5, 3) and v.shape == (4, 5, 3, 3)
    with pytest.raises(ValueError):
        sym3_eigh(torch.zeros(4, 2, 2))
    with pytest.raises(ValueError):
        sym3_eigh(torch.zeros(4, 3, 3, dtype=torch.int64))
