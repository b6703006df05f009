"""The near scale of the FA network's patch: the ``k`` a user asks for, or the one the
cloud's noise calls for.

No weight of :class:`~fapc.models.normal_net.NormalNet` depends on the patch's sizes (its
backbone pools over the points), so the same weights run at any near scale; they fit best
near the scale they were trained at, and a noiseless cloud's sharp edges and thin walls are
better served by a smaller one (the shipped model's ``clean_k_near``; the model card gives the
figures). Under light noise the points at sharp edges are too: there the network runs a second
time, at ``edge_k_near``, at the points whose fit is curved (``edge_curvature``), before the
consensus step. The same noise figure also decides whether the light smoothing
(:mod:`fapc.light`) runs: on lightly noisy clouds whose scatter is noise, not relief
(``light_whiteness``, :func:`light_for_figure`), and how many draws of the far scale are
averaged: on heavily noisy clouds and on noiseless ones (``heavy_draws``, ``clean_draws``,
:func:`draws_for_figure`), which weights the learned smoothing takes
(:func:`smoother_for_figure`), and whether the plane vote (:mod:`fapc.vote`) ends the
consensus step on noiseless clouds (``clean_vote``, :func:`vote_for_figure`), and whether the
exact planes (:mod:`fapc.exact`) end the estimate there (``clean_exact``,
:func:`exact_for_figure`).
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import numpy as np

log = logging.getLogger(__name__)

FA_K_RANGE = (8, 128)  # the FA network's near scale (``k``); tiles' halo reach assumes <= 128
FIGURE_POINTS = 200_000  # points a noise figure that chooses the near scale looks at
# the clean near scale only where at most this share of the figure's neighbourhoods are lines:
# a cloud sampled along scan lines gives a small near scale one or two lines, too thin a patch
CLEAN_LINES_MAX = 0.05


def with_near_scale(net: Any, k: int) -> Any:
    """``net`` (a patch network, :class:`~fapc.models.normal_net.NormalNet`) with a near scale
    of ``k`` points; a new module, so the cached shipped one stays as it is.

    Raises:
        ValueError: ``k`` outside :data:`FA_K_RANGE`, or a model without a near scale (a
            whole-shape model).
    """
    from fapc.models.normal_net import NormalNet

    if not isinstance(net, NormalNet):
        raise ValueError("k sets the near scale of a patch model; this model has none "
                         f"({type(net).__name__})")
    lo, hi = FA_K_RANGE
    if not lo <= k <= hi:
        raise ValueError(f"k for the FA network (its near scale) must be {lo}..{hi}, got {k}")
    return net.with_near_scale(k)


def figure_points(points: np.ndarray) -> np.ndarray:
    """The points of ``points (N, 3)`` (finite) whose noise figure chooses the near scale: all
    of them, or the :data:`FIGURE_POINTS` nearest their centroid (a compact block, so that the
    spacing is the cloud's own; tiles then all run at one scale)."""
    if len(points) <= FIGURE_POINTS:
        return points
    d2 = np.square(points - points.mean(axis=0)).sum(axis=1)
    return points[np.sort(np.argpartition(d2, FIGURE_POINTS)[:FIGURE_POINTS])]


def scale_for_figure(config: Any, figure: Any) -> int:
    """The near scale of a network with ``config`` on a cloud whose noise figure (of its
    :func:`figure_points`) is ``figure``: ``clean_k_near`` where the figure says noiseless
    (level ``none``) and the sampling has no scan lines (at most :data:`CLEAN_LINES_MAX` of
    its neighbourhoods are lines), else ``k_near``."""
    clean = getattr(config, "clean_k_near", 0)
    if clean and figure.level == "none" and figure.lines <= CLEAN_LINES_MAX:
        return clean
    return config.k_near


def edge_scale_for_figure(config: Any, figure: Any) -> int:
    """The near scale a network with ``config`` reruns its points of high curvature at on a
    cloud whose noise figure is ``figure``: ``edge_k_near`` where the figure says lightly
    noisy (level ``light``) and the sampling has no scan lines (as for ``clean_k_near``),
    else 0 (no second pass)."""
    edge = getattr(config, "edge_k_near", 0)
    if edge and figure.level == "light" and figure.lines <= CLEAN_LINES_MAX:
        return edge
    return 0


def light_for_figure(config: Any, figure: Any) -> bool:
    """Whether the light smoothing (:mod:`fapc.light`) runs by default for a network with
    ``config`` on a cloud whose noise figure is ``figure``: where the model sets
    ``light_whiteness``, the figure says lightly noisy (level ``light``), the sampling has no
    scan lines (as for ``clean_k_near``), and the scatter is noise rather than detail (its
    ``whiteness`` at least ``light_whiteness``: fine sculpted relief also reads ``light``,
    and the smoothing would round it)."""
    w = getattr(config, "light_whiteness", 0.0)
    return bool(w and figure.level == "light" and figure.lines <= CLEAN_LINES_MAX
                and figure.whiteness >= w)


def draws_for_figure(config: Any, figure: Any) -> int:
    """How many draws of the far scale (:func:`fapc.fa_run.fa_normals`'s ``draws``) a
    network with ``config`` averages on a cloud whose noise figure is ``figure``: the model's
    ``heavy_draws`` where the figure says heavily noisy (level ``heavy``), its
    ``clean_draws`` where it says noiseless (level ``none``), else 1. At both ends the
    choice of far points leaves a variance that averaging removes (at sharp edges, on
    noiseless clouds); on lightly noisy clouds, the scans most users have, one run keeps the
    speed."""
    draws = {"heavy": getattr(config, "heavy_draws", 0),
             "none": getattr(config, "clean_draws", 0)}.get(figure.level, 1)
    return max(1, draws)


def smoother_for_figure(figure: Any) -> str | None:
    """The learned smoothing's weights (:mod:`fapc.models.consensus_net`) on a cloud whose
    noise figure is ``figure``: the package's heavy-noise ones
    (:data:`fapc.models.checkpoint.HEAVY_CONSENSUS_MODEL`) where the figure says heavily noisy
    (level ``heavy``) and the package holds them, else None (the shipped
    ``consensus.safetensors``)."""
    from fapc.models.checkpoint import HEAVY_CONSENSUS_MODEL

    if figure.level == "heavy" and HEAVY_CONSENSUS_MODEL.exists():
        return str(HEAVY_CONSENSUS_MODEL)
    return None


def vote_for_figure(config: Any, figure: Any) -> bool:
    """Whether the plane vote (:mod:`fapc.vote`) runs by default for a network with
    ``config`` on a cloud whose noise figure is ``figure``: where the model sets
    ``clean_vote``, the figure says noiseless (level ``none``) and the sampling has no scan
    lines (as for ``clean_k_near``: a neighbouring scan line's plane can pass through a point
    by chance)."""
    return bool(getattr(config, "clean_vote", False)) and _noiseless_without_lines(figure)


def exact_for_figure(config: Any, figure: Any) -> bool:
    """Whether the exact planes (:mod:`fapc.exact`) run by default for a network with
    ``config`` on a cloud whose noise figure is ``figure``: where the model sets
    ``clean_exact``, the figure says noiseless (level ``none``) and the sampling has no scan
    lines (a plane through a scan line holds the whole line)."""
    return bool(getattr(config, "clean_exact", False)) and _noiseless_without_lines(figure)


def _noiseless_without_lines(figure: Any) -> bool:
    """The figure says noiseless (level ``none``) and at most ``CLEAN_LINES_MAX`` of the
    neighbourhoods are scan lines: where the noiseless-only steps run by default."""
    return figure.level == "none" and figure.lines <= CLEAN_LINES_MAX


class Choices(NamedTuple):
    """What a patch network does on a cloud where the user chooses nothing."""

    k: int  # near scale (scale_for_figure)
    edge: int  # near scale of the second run at curved fits (edge_scale_for_figure; 0: none)
    light: bool  # the light smoothing (light_for_figure)
    draws: int  # draws of the far scale averaged (draws_for_figure)
    smoother: str | None = None  # the learned smoothing's weights (smoother_for_figure)
    vote: bool = False  # the plane vote as the consensus step's last pass (vote_for_figure)
    exact: bool = False  # the exact planes after the draws (exact_for_figure)


def choices_for_figure(config: Any, figure: Any) -> Choices:
    """The :class:`Choices` of a network with ``config`` on a cloud whose noise figure is
    ``figure`` (:func:`scale_for_figure`, :func:`edge_scale_for_figure`,
    :func:`light_for_figure`, :func:`draws_for_figure`, :func:`smoother_for_figure`,
    :func:`vote_for_figure`, :func:`exact_for_figure`)."""
    return Choices(scale_for_figure(config, figure), edge_scale_for_figure(config, figure),
                   light_for_figure(config, figure), draws_for_figure(config, figure),
                   smoother_for_figure(figure), vote_for_figure(config, figure),
                   exact_for_figure(config, figure))


def choices_for(points: np.ndarray, net: Any) -> Choices:
    """What a patch network does on ``points (N, 3)`` (finite) where the user chooses
    nothing (:class:`Choices`), all from the noise figure of :func:`figure_points` (a model
    with none of these settings takes no figure). Built on distances only, so the choice does
    not depend on the cloud's pose."""
    c = net.config
    clean = getattr(c, "clean_k_near", 0) not in (0, c.k_near)
    if not (clean or getattr(c, "edge_k_near", 0) or getattr(c, "light_whiteness", 0)
            or max(getattr(c, "heavy_draws", 0), getattr(c, "clean_draws", 0)) > 1
            or getattr(c, "clean_vote", False) or getattr(c, "clean_exact", False)):
        return Choices(c.k_near, 0, False, 1)
    from fapc.noise import noise_figure

    fig = noise_figure(figure_points(points))
    out = choices_for_figure(c, fig)
    log.debug("noise figure %.4f (%s, lines %.3f, whiteness %.3f): %s", fig.ratio, fig.level,
              fig.lines, fig.whiteness, out)
    return out


def near_scales_for(points: np.ndarray, net: Any) -> tuple[int, int]:
    """The near scale and edge scale of :func:`choices_for`."""
    k, edge, *_ = choices_for(points, net)
    return k, edge


def near_scale_for(points: np.ndarray, net: Any) -> int:
    """The near scale of :func:`near_scales_for`."""
    return near_scales_for(points, net)[0]
