"""Offscreen pictures of clouds with matplotlib's Agg backend: no display, no GPU, no OpenGL.

(open3d's offscreen renderer needs EGL or a GPU; matplotlib draws anywhere.) Points are
projected orthographically for several fixed views, drawn far to near, and coloured by their
normal (``rgb = (n + 1) / 2``, shaded by a fixed light) or by any per-point field through a
colour map.
"""

from __future__ import annotations

import os

import numpy as np

VIEWS = {"front": (0.0, 0.0), "side": (90.0, 0.0), "top": (0.0, 89.9), "iso": (35.0, 30.0)}


def _view_matrix(azim: float, elev: float) -> np.ndarray:
    a, e = np.radians(azim), np.radians(elev)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(e), -np.sin(e)], [0, np.sin(e), np.cos(e)]])
    # camera looks along -y after the rotation: x right, z up, y depth
    return rx @ rz


def colours(points: np.ndarray, *, normals: np.ndarray | None = None,
            field: np.ndarray | None = None, cmap: str = "viridis",
            vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """``(N, 4)`` RGBA: by ``field`` when given, else by ``normals``, else grey by height."""
    import matplotlib

    if field is not None:
        f = np.asarray(field, np.float64)
        lo = np.nanmin(f) if vmin is None else vmin
        hi = np.nanmax(f) if vmax is None else vmax
        return matplotlib.colormaps[cmap]((f - lo) / max(hi - lo, 1e-12))
    if normals is not None:
        n = normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
        rgb = np.clip((n + 1) / 2, 0, 1)
        return np.column_stack([rgb, np.ones(len(n))])
    z = points[:, 2]
    g = 0.3 + 0.6 * (z - z.min()) / max(np.ptp(z), 1e-12)
    return np.column_stack([g, g, g, np.ones(len(g))])


def render(points: np.ndarray, path: str | os.PathLike, *, normals: np.ndarray | None = None,
           field: np.ndarray | None = None, views: tuple[str, ...] = ("front", "side", "iso"),
           title: str = "", cmap: str = "viridis", vmin: float | None = None,
           vmax: float | None = None, size: float = 4.0, max_points: int = 300_000,
           seed: int = 0) -> None:
    """Write a PNG with one panel per view of ``points (N, 3)``.

    Args:
        normals: colour by normal direction (and shade by a fixed light).
        field: colour by this per-point scalar (confidence, curvature, error...).
        views: names from :data:`VIEWS`.
        max_points: draw at most this many (a seeded random subset).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    pts = np.asarray(points, np.float64)
    ok = np.isfinite(pts).all(1)
    sel = np.flatnonzero(ok)
    if len(sel) > max_points:
        sel = np.sort(np.random.default_rng(seed).choice(sel, max_points, replace=False))
    pts = pts[sel] - pts[sel].mean(0)
    nrm = None if normals is None else np.asarray(normals, np.float64)[sel]
    fld = None if field is None else np.asarray(field)[sel]
    rgba = colours(pts, normals=nrm, field=fld, cmap=cmap, vmin=vmin, vmax=vmax)
    fig, axes = plt.subplots(1, len(views), figsize=(size * len(views), size), squeeze=False)
    extent = np.linalg.norm(pts, axis=1).max() * 1.02 if len(pts) else 1.0
    marker = max(0.05, min(4.0, 4e4 / max(len(pts), 1)))
    for ax, name in zip(axes[0], views, strict=True):
        rot = _view_matrix(*VIEWS[name])
        p = pts @ rot.T
        order = np.argsort(-p[:, 1])  # far (large y) first
        c = rgba[order].copy()
        if nrm is not None and fld is None:  # shade: light from the camera
            shade = np.abs((nrm[order] @ rot.T)[:, 1])
            c[:, :3] *= (0.35 + 0.65 * shade)[:, None]
        ax.scatter(p[order, 0], p[order, 2], c=c, s=marker, linewidths=0, marker=".")
        ax.set_xlim(-extent, extent)
        ax.set_ylim(-extent, extent)
        ax.set_aspect("equal")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=100, facecolor="white")
    plt.close(fig)


def error_histogram(errors: dict[str, np.ndarray], path: str | os.PathLike, *,
                    title: str = "") -> None:
    """Histogram of angle errors (degrees), one curve per label."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, 90, 46)
    for label, e in errors.items():
        ax.hist(e, bins=bins, histtype="step", label=label, density=True)
    ax.set_xlabel("unoriented angle error (deg)")
    ax.set_ylabel("density")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=100)
    plt.close(fig)
