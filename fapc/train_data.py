"""Training data: the pool of sampled clouds that patches are drawn from, the validation
patches, and the stream that builds batches in ``DataLoader`` worker processes.

With ``workers=0`` batches are built in the training process, in an order fixed by the seed
(the shipped model's run). With ``workers=W`` each of ``W`` processes holds its own pool,
seeded by ``(seed, rank, worker)``; batches then arrive in the order the workers finish them,
so such a run is not bit-reproducible, and ``--resume`` restarts the workers' pools.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import numpy as np
import torch

from fapc.datasets import Shape, make_cloud
from fapc.errors import FapcError
from fapc.patches import PatchBuilder

if TYPE_CHECKING:
    from fapc.train import TrainConfig


class _Cloud:
    """One sampled cloud of the pool: its patch builder and normals ``(N, 3)``; with a bank,
    instead, ``bank`` patches built at once ``(M, P, 3)`` and their normals ``(M, 3)``.
    ``group``: the id of its shape and noise level (:func:`group_id`)."""

    def __init__(self, builder: PatchBuilder, normals: np.ndarray, *, bank: int,
                 rng: np.random.Generator, group: int = 0) -> None:
        self.group = group
        self.good = np.flatnonzero(np.abs(normals).sum(1) > 0)
        self.builder: PatchBuilder | None = builder
        self.normals = normals
        self.bank: tuple[np.ndarray, np.ndarray] | None = None
        if bank:  # one large query costs about what a few small ones do
            q = rng.choice(self.good, size=min(bank, len(self.good)), replace=False)
            self.bank = (builder.patches(q)[0], normals[q].astype(np.float32))
            self.builder = None

    def sample(self, rng: np.random.Generator, m: int) -> tuple[np.ndarray, np.ndarray]:
        """``m`` patches ``(m, P, 3)`` and their normals ``(m, 3)``."""
        if self.bank is not None:
            p, n = self.bank
            i = rng.choice(len(p), size=m, replace=len(p) < m)
            return p[i], n[i]
        q = rng.choice(self.good, size=m, replace=len(self.good) < m)
        return self.builder.patches(q)[0], self.normals[q].astype(np.float32)


def group_id(shape: int, noise: float, cfg: TrainConfig) -> int:
    """The loss group of a cloud: its shape index and noise level, ``shape * levels + level``
    (:class:`fapc.losses.GroupRMSELoss`; the benchmark scores each such cloud by its RMSE).
    A noise between the levels takes the nearest level in log scale (0 counts as
    ``cfg.noise_low / 2``)."""
    floor = cfg.noise_low / 2
    logs = np.log(np.maximum(np.asarray(cfg.noise, dtype=float), floor))
    return shape * len(cfg.noise) + int(np.argmin(np.abs(logs - np.log(max(noise, floor)))))


def draw_noise(rng: np.random.Generator, cfg: TrainConfig) -> float:
    """One training cloud's noise (fraction of the diagonal): one of ``cfg.noise``, or with
    probability ``cfg.noise_spread`` log-uniform between ``cfg.noise_low`` and the largest
    level."""
    if cfg.noise_spread > 0 and rng.random() < cfg.noise_spread:
        lo, hi = np.log(cfg.noise_low), np.log(max(cfg.noise))
        return float(np.exp(rng.uniform(lo, hi)))
    return float(rng.choice(cfg.noise))


def draw_points(rng: np.random.Generator, cfg: TrainConfig) -> int:
    """One training cloud's size: ``cfg.points``, or log-uniform in ``[cfg.points_low,
    cfg.points]`` when ``points_low`` is set."""
    if cfg.points_low > 0:
        return int(np.exp(rng.uniform(np.log(cfg.points_low), np.log(cfg.points))))
    return cfg.points


class Pool:
    """Clouds currently sampled from, each with its patch builder (or, with ``cfg.bank``, a
    bank of patches built when the cloud is made); refreshed over time."""

    def __init__(self, shapes: list[Shape], cfg: TrainConfig, spec, seed: int) -> None:
        self.shapes, self.cfg, self.spec, self.seed = shapes, cfg, spec, seed
        self.items: list[_Cloud] = []

    def _make(self, draw: int) -> _Cloud:
        rng = np.random.default_rng([self.seed, draw])
        index = int(rng.integers(len(self.shapes)))
        shape = self.shapes[index]
        noise = draw_noise(rng, self.cfg)
        density = "uniform"
        if rng.random() < self.cfg.density_prob:
            density = str(rng.choice(["gradient", "stripe"]))
        pts, nrm = make_cloud(shape, n=draw_points(rng, self.cfg), noise=noise, density=density,
                              outliers=self.cfg.outliers, seed=int(rng.integers(1 << 31)))
        pts = pts - pts.mean(0)
        return _Cloud(PatchBuilder(pts, self.spec, seed=draw), nrm, bank=self.cfg.bank,
                      rng=np.random.default_rng([self.seed, draw, 2]),
                      group=group_id(index, noise, self.cfg))

    def refresh(self, step: int) -> None:
        """Deterministic in ``step``: a resumed run sees the same clouds."""
        base = (step // self.cfg.refresh_every) * self.cfg.pool
        if not self.items:
            self.items = [self._make(base + i) for i in range(self.cfg.pool)]
        else:
            slot = (step // self.cfg.refresh_every) % self.cfg.pool
            self.items[slot] = self._make(base + slot)

    def shape_batch(self, rng: np.random.Generator, size: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``size`` whole clouds of ``shape_points`` points: ``(B, N, 3)``, normals
        ``(B, N, 3)`` and loss groups ``(B, N)``."""
        ps, ns, gs = [], [], []
        for _ in range(size):
            index = int(rng.integers(len(self.shapes)))
            noise = float(rng.choice(self.cfg.noise))
            pts, nrm = make_cloud(self.shapes[index], n=self.cfg.shape_points, noise=noise,
                                  seed=int(rng.integers(1 << 31)))
            if len(pts) < self.cfg.shape_points:  # a small cloud: repeat points
                extra = rng.choice(len(pts), self.cfg.shape_points - len(pts))
                pts, nrm = np.concatenate([pts, pts[extra]]), np.concatenate([nrm, nrm[extra]])
            ps.append(pts.astype(np.float32))
            ns.append(nrm.astype(np.float32))
            gs.append(np.full(len(pts), group_id(index, noise, self.cfg)))
        return (torch.from_numpy(np.stack(ps)), torch.from_numpy(np.stack(ns)),
                torch.from_numpy(np.stack(gs)))

    def batch(self, rng: np.random.Generator, size: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``size`` patches ``(B, P, 3)``, their normals ``(B, 3)`` and loss groups ``(B,)``,
        spread evenly over the pool's clouds."""
        per = np.full(len(self.items), size // len(self.items))
        per[: size % len(self.items)] += 1
        ps, ns, gs = [], [], []
        for cloud, m in zip(self.items, per, strict=True):
            p, n = cloud.sample(rng, m)
            ps.append(p)
            ns.append(n)
            gs.append(np.full(len(p), cloud.group))
        return (torch.from_numpy(np.concatenate(ps)), torch.from_numpy(np.concatenate(ns)),
                torch.from_numpy(np.concatenate(gs)))


def split_shapes(shapes: list[Shape], fraction: float, seed: int, *,
                 names: tuple[str, ...] | list[str] = ()) -> tuple[list[Shape], list[Shape]]:
    """Hold out whole shapes for validation: the shapes called ``names`` when given (so the
    held-out set can be chosen by kind, e.g. one sharp CAD part, one sculpted model, one
    primitive), else ``fraction`` of them by a seeded shuffle of names."""
    if names:
        missing = sorted(set(names) - {s.name for s in shapes})
        if missing:
            raise FapcError(f"validation shapes not among the training data: {missing}")
        return ([s for s in shapes if s.name not in names], [s for s in shapes if s.name in names])
    order = sorted(s.name for s in shapes)
    rng = random.Random(seed)
    rng.shuffle(order)
    n_val = min(len(order) - 1, max(1, round(fraction * len(order)))) if len(order) > 1 else 0
    val = set(order[:n_val])
    return [s for s in shapes if s.name not in val], [s for s in shapes if s.name in val]


def validation_set(shapes: list[Shape], cfg: TrainConfig, spec) -> list[tuple[str, torch.Tensor,
                                                                           torch.Tensor]]:
    """Fixed patches: every validation shape at every noise level, ``val_queries`` each
    (shape mode: 4 whole clouds of ``shape_points`` points each)."""
    out = []
    if cfg.mode == "shape":
        for i, s in enumerate(shapes):
            for j, noise in enumerate(cfg.noise):
                clouds = [make_cloud(s, n=cfg.shape_points, noise=noise,
                                     seed=10_000 + 97 * i + 13 * j + r) for r in range(4)]
                m = min(len(p) for p, _ in clouds)
                out.append((f"{s.name}@{noise:g}",
                            torch.from_numpy(np.stack([p[:m] for p, _ in clouds]).astype(np.float32)),
                            torch.from_numpy(np.stack([n[:m] for _, n in clouds]).astype(np.float32))))
        return out
    for i, s in enumerate(shapes):
        for j, noise in enumerate(cfg.noise):
            pts, nrm = make_cloud(s, n=cfg.points, noise=noise, seed=10_000 + 97 * i + j)
            pts = pts - pts.mean(0)
            rng = np.random.default_rng(20_000 + 97 * i + j)
            good = np.flatnonzero(np.abs(nrm).sum(1) > 0)
            q = rng.choice(good, size=min(cfg.val_queries, len(good)), replace=False)
            p, _, _ = PatchBuilder(pts, spec, seed=i).patches(q)
            out.append((f"{s.name}@{noise:g}", torch.from_numpy(p),
                        torch.from_numpy(nrm[q].astype(np.float32))))
    return out


class PatchStream(torch.utils.data.IterableDataset):
    """Endless training batches, ``(patches (B, P, 3), normals (B, 3), groups (B,))`` (shape
    mode: ``(B, N, 3)`` clouds, ``(B, N, 3)`` normals and ``(B, N)`` groups), for a ``DataLoader`` with
    ``batch_size=None``. Each worker builds its own :class:`Pool` and refreshes one of its
    clouds every ``refresh_every`` of its batches, as the in-process loop does."""

    def __init__(self, shapes: list[Shape], cfg: TrainConfig, spec, *, seed: int) -> None:
        super().__init__()
        self.shapes, self.cfg, self.spec, self.seed = shapes, cfg, spec, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        torch.set_num_threads(1)
        pool = Pool(self.shapes, self.cfg, self.spec, seed=self.seed + 100_000 * (worker + 1))
        yield from _endless(pool, self.cfg, np.random.default_rng([self.seed, worker, 1]), 0)


def batch_stream(shapes: list[Shape], cfg: TrainConfig, spec, *, seed: int, step: int,
                 rank: int, pin: bool):
    """An iterator of training batches. ``cfg.workers == 0``: built here, deterministic in
    ``(seed, rank, step)`` (a resumed run sees the same clouds). Else a ``DataLoader`` over
    :class:`PatchStream` in ``cfg.workers`` processes."""
    if cfg.workers < 0:
        raise FapcError(f"workers must be >= 0, got {cfg.workers}")
    if cfg.workers > 0:
        loader = torch.utils.data.DataLoader(
            PatchStream(shapes, cfg, spec, seed=seed), batch_size=None, num_workers=cfg.workers,
            pin_memory=pin, prefetch_factor=4, persistent_workers=True)
        yield from loader
        return
    rng = np.random.default_rng([cfg.seed, rank] if step == 0 else [cfg.seed, rank, step])
    yield from _endless(Pool(shapes, cfg, spec, seed=seed), cfg, rng, step)


def _endless(pool: Pool, cfg: TrainConfig, rng: np.random.Generator, step: int):
    """Batches from ``pool`` for ever, from ``step`` on; in patch mode one cloud is replaced
    every ``refresh_every`` steps (all of them first, or on a resume)."""
    while True:
        if cfg.mode == "shape":
            yield pool.shape_batch(rng, cfg.batch_size)
        else:
            if step % cfg.refresh_every == 0 or not pool.items:
                pool.refresh(step)
            yield pool.batch(rng, cfg.batch_size)
        step += 1
