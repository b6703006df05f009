"""The plane vote (:mod:`fapc.vote`): on noiseless data each normal comes back to the face
its point lies on and small errors on a face average down; noisy clouds are left alone; the
result moves with the cloud; the model's choice runs it on noiseless clouds without scan
lines only; it reaches the pipeline, the tiles and the CLI."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import angle_deg
from scipy.spatial import cKDTree
from test_light_smoothing import cube_surface

from fapc.consensus import ConsensusSettings, spread
from fapc.models.checkpoint import load_model
from fapc.models.normal_net import NormalNet
from fapc.near_scale import choices_for, exact_for_figure, vote_for_figure
from fapc.noise import noise_figure
from fapc.normals import estimate_normals
from fapc.testing import random_rotation
from fapc.vote import VoteSettings, plane_vote


def rmse(err: np.ndarray) -> float:
    return float(np.sqrt(np.mean(err ** 2)))


def near_edge(pts: np.ndarray, within: float) -> np.ndarray:
    """``(N,)`` bool: points within ``within`` of one of the cube's edges."""
    return np.sort(np.abs(pts), axis=1)[:, 1] > 0.5 - within


def tilt(normals: np.ndarray, pts: np.ndarray, *, within: float, deg: float,
         seed: int) -> np.ndarray:
    """``normals`` with those within ``within`` of an edge blended toward the other face
    there (by ``deg`` degrees), and every normal jittered by about 0.05 degrees: what a fit that
    straddles the edge and a network's small errors leave."""
    rng = np.random.default_rng(seed)
    out = normals.copy()
    at = near_edge(pts, within)
    a = np.abs(pts[at])
    other = np.argsort(a, axis=1)[:, 1]  # the axis of the other face at that edge
    second = np.eye(3)[other] * np.sign(pts[at, other])[:, None]
    own = out[at] * np.sign((out[at] * pts[at]).sum(1, keepdims=True))
    t = np.radians(deg)
    out[at] = np.cos(t) * own + np.sin(t) * second
    out += np.radians(0.05) * rng.normal(size=out.shape)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def vote(pts: np.ndarray, nrm: np.ndarray, *, spreads_from: np.ndarray | None = None
         ) -> tuple[np.ndarray, np.ndarray]:
    """The pass at every point as the pipeline runs it (candidates: the 48 nearest; support:
    the 16 nearest): normals and the gate. ``spreads_from``: the normals whose spreads set
    the gate and the noise level (default ``nrm``)."""
    _, idx = cKDTree(pts).query(pts, k=48)
    p, n, idx = torch.from_numpy(pts), torch.from_numpy(nrm), torch.from_numpy(idx)
    every = torch.arange(len(p))
    sn = n if spreads_from is None else torch.from_numpy(spreads_from)
    spreads = spread(p, sn, every, idx[:, :ConsensusSettings.spread_k])
    out, voted = plane_vote(p, n, spreads, query=every, candidates=idx, support=idx[:, :16])
    return out.numpy(), voted.numpy()


def test_normals_leaning_at_an_edge_come_back_to_their_face() -> None:
    pts, gt = cube_surface(30000, seed=1)
    bent = tilt(gt, pts, within=0.01, deg=30.0, seed=2)
    out, voted = vote(pts, bent, spreads_from=gt)  # the faces' exact planes set the gate
    edge = near_edge(pts, 0.01)
    assert edge.sum() > 1000 and voted.mean() > 0.95
    before, after = rmse(angle_deg(bent[edge], gt[edge])), rmse(angle_deg(out[edge], gt[edge]))
    assert before > 25 and after < 0.3 * before, (before, after)
    face = ~near_edge(pts, 0.05)  # away from the edges the small errors average down
    assert rmse(angle_deg(out[face], gt[face])) < 0.5 * rmse(angle_deg(bent[face], gt[face]))


def test_noisy_clouds_are_left_alone_and_right_normals_stay() -> None:
    pts, gt = cube_surface(20000, seed=3)
    out, voted = vote(pts, gt)
    assert voted.all()  # noiseless: every plane is exact
    on_edge = near_edge(pts, 0.0002)  # both faces' planes hold these points (1 % of a
    # spacing from the crease line): the one with more voters wins, either is a right answer
    assert on_edge.sum() < 20
    assert angle_deg(out[~on_edge], gt[~on_edge]).max() < 1e-6
    noisy = pts + 0.002 * np.random.default_rng(4).normal(size=pts.shape)
    bent = tilt(gt, pts, within=0.01, deg=30.0, seed=5)
    out, voted = vote(noisy, bent)
    assert voted.mean() < 0.01
    np.testing.assert_array_equal(out[~voted], bent[~voted])


@pytest.mark.parametrize("seed", [0, 1])
def test_the_result_moves_with_the_cloud(seed: int) -> None:
    """float64, seeded rotations (and, for seed 1, a reflection), translations and
    permutations."""
    pts, gt = cube_surface(8000, seed=seed)
    bent = tilt(gt, pts, within=0.02, deg=20.0, seed=7 + seed)
    out, voted = vote(pts, bent, spreads_from=gt)
    assert voted.mean() > 0.9
    r = random_rotation(torch.Generator().manual_seed(11 + seed), reflect=bool(seed)).numpy()
    perm = np.random.default_rng(seed + 2).permutation(len(pts))
    moved, moved_voted = vote(pts[perm] @ r.T + [3.0, -1.0, 2.0], bent[perm] @ r.T,
                              spreads_from=gt[perm] @ r.T)
    np.testing.assert_array_equal(moved_voted, voted[perm])
    expect = out[perm] @ r.T
    sign = np.sign((moved * expect).sum(1, keepdims=True))
    assert np.abs(moved - sign * expect).max() < 1e-9
    assert angle_deg(out, bent).max() > 5  # it did move normals


def test_refuses_bad_inputs() -> None:
    p = torch.zeros(40, 3, dtype=torch.float64)
    sp = torch.zeros(40, dtype=torch.float64)
    q = torch.arange(5)
    cand, sup = torch.zeros(5, 48, dtype=torch.long), torch.zeros(5, 16, dtype=torch.long)
    with pytest.raises(ValueError, match="shape"):
        plane_vote(p[:, :2], p[:, :2], sp, query=q, candidates=cand, support=sup)
    with pytest.raises(ValueError, match="one row per query"):
        plane_vote(p, p, sp, query=q, candidates=cand[:4], support=sup)
    with pytest.raises(ValueError, match="more than"):
        plane_vote(p, p, sp, query=q, candidates=cand, support=sup[:, :5])
    with pytest.raises(ValueError, match="must be > 0"):
        VoteSettings(floor=0.0)
    with pytest.raises(ValueError, match="choose one"):
        estimate_normals(cube_surface(500)[0], device="cpu", light_smoothing=True,
                         plane_vote=True)


def _copy(base: NormalNet, on: bool) -> NormalNet:
    net = NormalNet(replace(base.config, clean_vote=on))
    net.load_state_dict(base.state_dict())
    return net.eval()


def test_the_pipeline_gains_on_a_noiseless_cube_and_queries_agree() -> None:
    pts, gt = cube_surface(6000, seed=6)
    one = {"device": "cpu", "draws": 1}  # (the model's draws on a noiseless cloud: 4)
    on = estimate_normals(pts, plane_vote=True, **one).normals
    off = estimate_normals(pts, plane_vote=False, **one).normals
    e_on, e_off = rmse(angle_deg(on, gt)), rmse(angle_deg(off, gt))
    assert e_on < e_off - 0.1, (e_off, e_on)
    q = np.random.default_rng(8).choice(len(pts), 300, replace=False)
    part = estimate_normals(pts, query_index=q, plane_vote=True, **one).normals
    assert angle_deg(part, on[q]).max() < 1e-4
    # the model's own choice: a noiseless cloud without scan lines, where the model sets it
    base = load_model(None)[0]
    np.testing.assert_array_equal(
        estimate_normals(pts, model=_copy(base, True), **one).normals, on)
    np.testing.assert_array_equal(
        estimate_normals(pts, model=_copy(base, False), **one).normals, off)
    # nothing without the consensus step
    np.testing.assert_array_equal(
        estimate_normals(pts, consensus=False, plane_vote=True, **one).normals,
        estimate_normals(pts, consensus=False, plane_vote=False, **one).normals)


def three_levels() -> tuple[list[np.ndarray], list]:
    """A cube noiseless, lightly and heavily noisy, and their noise figures (checked)."""
    clean, _ = cube_surface(8000, seed=9)
    light = clean + 0.002 * np.random.default_rng(10).normal(size=clean.shape)
    heavy = clean + 0.03 * np.random.default_rng(11).normal(size=clean.shape)
    figs = [noise_figure(p) for p in (clean, light, heavy)]
    assert [f.level for f in figs] == ["none", "light", "heavy"]
    return [clean, light, heavy], figs


@pytest.mark.parametrize(("field", "choice", "for_figure"),
                         [("clean_vote", "vote", vote_for_figure),
                          ("clean_exact", "exact", exact_for_figure)])
def test_chosen_on_noiseless_clouds_without_scan_lines_only(field, choice, for_figure) -> None:
    """The plane vote and the exact planes (:mod:`fapc.exact`) share the gate."""
    base = load_model(None)[0]

    def copy(on: bool) -> NormalNet:
        net = NormalNet(replace(base.config, **{field: on}))
        net.load_state_dict(base.state_dict())
        return net.eval()

    net = copy(True)
    (clean, light, heavy), figs = three_levels()
    assert [getattr(choices_for(p, net), choice) for p in (clean, light, heavy)] == [
        True, False, False]
    assert not getattr(choices_for(clean, copy(False)), choice)
    lined = replace(figs[0], lines=0.5)  # a cloud sampled along scan lines
    assert not for_figure(net.config, lined) and for_figure(net.config, figs[0])


def test_progress_counts_the_extra_pass() -> None:
    pts, _ = cube_surface(3000, seed=14)
    calls: list[tuple[int, int]] = []
    estimate_normals(pts, device="cpu", batch_size=500, draws=1, plane_vote=True,
                     progress=lambda d, t: calls.append((d, t)))
    passes = ConsensusSettings.snap_passes + 1
    assert {t for _, t in calls} == {(1 + passes) * len(pts)}
    assert calls[-1][0] == (1 + passes) * len(pts)


def test_tiles_cover_the_extra_hop() -> None:
    pts, _ = cube_surface(8000, seed=12)
    one = {"device": "cpu", "draws": 1, "plane_vote": True}
    whole = estimate_normals(pts, tile_points=None, **one).normals
    tiled = estimate_normals(pts, tile_points=3000, **one).normals
    assert angle_deg(tiled, whole).max() < 1e-3


def test_cli_flags(tmp_path) -> None:
    """``fapc normals --plane-vote`` gives what ``estimate_normals(plane_vote=True)`` gives;
    with ``--light-smoothing`` too, a one-line error and exit 2."""
    from typer.testing import CliRunner

    from fapc.cli import app
    from fapc.io import PointCloud, read_cloud, write_cloud

    pts, _ = cube_surface(3000, seed=13)
    pts = pts.astype(np.float32)
    write_cloud(tmp_path / "c.ply", PointCloud(pts))
    runner = CliRunner()
    r = runner.invoke(app, ["normals", str(tmp_path / "c.ply"), "-o", str(tmp_path / "v.ply"),
                            "--device", "cpu", "--plane-vote"])
    assert r.exit_code == 0, r.output
    got = read_cloud(tmp_path / "v.ply").normals
    want = estimate_normals(pts.astype(np.float64), device="cpu", plane_vote=True).normals
    assert angle_deg(got, want).max() < 1e-3
    r = runner.invoke(app, ["normals", str(tmp_path / "c.ply"), "-o", str(tmp_path / "w.ply"),
                            "--plane-vote", "--light-smoothing"])
    assert r.exit_code == 2
    assert "error:" in r.output and "choose one" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "w.ply").exists()
