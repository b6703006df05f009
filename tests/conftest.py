"""Shared fixtures: small procedural clouds (tests never read the benchmark data)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fapc.cloud import PointCloud

os.environ.setdefault("OMP_NUM_THREADS", "2")


def sphere_points(n: int, seed: int = 0, radius: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = rng.normal(size=(n, 3))
    return radius * p / np.linalg.norm(p, axis=1, keepdims=True)


def plane_points(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.column_stack([rng.uniform(-1, 1, n), rng.uniform(-1, 1, n), np.zeros(n)])


def angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Unoriented angle between rows of a and b, degrees."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.degrees(np.arccos(np.clip(np.abs((a * b).sum(1)), 0, 1)))


@pytest.fixture
def rich_cloud() -> PointCloud:
    """A cloud with colours, intensity, a custom float, labels and float64 positions."""
    rng = np.random.default_rng(3)
    n = 500
    pts = sphere_points(n, seed=3) + np.array([5e5, 4e6, 100.0])
    return PointCloud(
        points=pts,
        attributes={
            "red": rng.integers(0, 256, n).astype(np.uint8),
            "green": rng.integers(0, 256, n).astype(np.uint8),
            "blue": rng.integers(0, 256, n).astype(np.uint8),
            "intensity": rng.random(n).astype(np.float32),
            "my_custom": rng.normal(size=n).astype(np.float32),
            "label": rng.integers(-5, 1000, n).astype(np.int32),
        },
    )
