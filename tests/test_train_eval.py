"""Training, checkpoints, resume, DDP, evaluation and refusal of pickled models (small, CPU)."""

from __future__ import annotations

import csv
import json
import math
import os
import pickle
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import angle_deg
from typer.testing import CliRunner

from fapc.cli import app
from fapc.datasets import Shape, procedural_shapes
from fapc.errors import FapcError
from fapc.evaluate import build_clouds, evaluate, model_method, pca_method
from fapc.models.checkpoint import load_model, save_model
from fapc.models.normal_net import NormalNet, NormalNetConfig
from fapc.train import TrainConfig, evaluate_patches, split_shapes, train
from fapc.train_data import validation_set

runner = CliRunner()

TINY = dict(points=4000, k_near=16, k_far=16, far_stride=4, batch_size=64, val_queries=100,
            procedural_names=("sphere", "box"), pool=2, refresh_every=10, noise=(0.0, 0.003),
            lr=1e-2)


def _log(run) -> list[dict]:
    with open(os.path.join(run, "log.csv")) as f:
        return list(csv.DictReader(f))


def test_training_lowers_validation_loss_and_writes_the_run(tmp_path):
    torch.manual_seed(0)
    cfg = TrainConfig(out=str(tmp_path / "run"), epochs=4, steps_per_epoch=10, **TINY)
    model0 = NormalNet(cfg.model_config())
    from fapc.train import evaluate_patches, validation_set

    val = validation_set(procedural_shapes(("box", "cube")), cfg, cfg.model_config().patch)
    torch.manual_seed(cfg.seed)
    before = evaluate_patches(NormalNet(cfg.model_config()), val, torch.device("cpu"))
    del model0
    train(cfg)
    rows = _log(tmp_path / "run")
    assert [int(r["step"]) for r in rows] == [10, 20, 30, 40]
    assert float(rows[-1]["val_loss"]) < before["val_loss"]
    for name in ("best.safetensors", "last.safetensors", "state.pt", "config.json"):
        assert (tmp_path / "run" / name).exists()


def test_save_load_gives_identical_outputs(tmp_path):
    torch.manual_seed(1)
    m = NormalNet(NormalNetConfig(k_near=8, k_far=8)).eval()
    p = torch.randn(20, 16, 3)
    save_model(tmp_path / "m.safetensors", m, metrics={"val_rmse": 1.5})
    m2, info = load_model(tmp_path / "m.safetensors")
    assert info["metrics"]["val_rmse"] == 1.5 and info["config"].k_near == 8
    assert info["fapc_version"]
    with torch.no_grad():
        a, b = m(p), m2(p)
    for k in ("normal", "confidence", "curvature"):
        assert torch.equal(a[k], b[k])


def test_resume_continues_from_the_step_it_stopped(tmp_path):
    run = str(tmp_path / "run")
    train(TrainConfig(out=run, epochs=4, steps_per_epoch=10, max_steps=20, **TINY))
    assert [int(r["step"]) for r in _log(run)] == [10, 20]
    state = torch.load(os.path.join(run, "state.pt"), weights_only=True)
    assert state["step"] == 20
    train(TrainConfig(out=run, epochs=4, steps_per_epoch=10, **TINY), resume=True)
    assert [int(r["step"]) for r in _log(run)] == [10, 20, 30, 40]


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['FAPC_EVIL_MARK']}",))


@pytest.mark.parametrize("name", ["evil.safetensors", "evil.pt"])
def test_pickled_model_is_refused_and_never_run(tmp_path, monkeypatch, name):
    mark = tmp_path / "pwned"
    monkeypatch.setenv("FAPC_EVIL_MARK", str(mark))
    evil = tmp_path / name
    with open(evil, "wb") as f:
        pickle.dump(_Evil(), f)
    with pytest.raises(FapcError, match="safetensors"):
        load_model(evil)
    r = runner.invoke(app, ["normals", "--model", str(evil), str(tmp_path / "x.ply")])
    assert r.exit_code == 1 and "safetensors" in r.stderr
    torch.save({"x": _Evil()}, tmp_path / "zip.safetensors")
    with pytest.raises(FapcError, match="zip archive"):
        load_model(tmp_path / "zip.safetensors")
    assert not mark.exists()  # nothing was unpickled
    # the test can fail: unpickling it really would have run the command
    with open(evil, "rb") as f:
        pickle.load(f)
    assert mark.exists()


def test_pca_baseline_near_zero_on_noiseless_plane_and_sphere():
    import trimesh

    sphere = trimesh.creation.icosphere(subdivisions=6)
    plane = trimesh.creation.box(extents=(2, 2, 0.001))
    shapes = [Shape("sphere", np.asarray(sphere.vertices), faces=np.asarray(sphere.faces))]
    clouds = build_clouds(shapes, columns=("none",), points=30_000, queries=500)
    rng = np.random.default_rng(0)
    pts = np.column_stack([rng.uniform(-1, 1, 20_000), rng.uniform(-1, 1, 20_000),
                           np.zeros(20_000)])
    flat = Shape("plane", pts, normals=np.tile([0.0, 0.0, 1.0], (20_000, 1)))
    clouds += build_clouds([flat], queries=500)
    del plane
    rep = evaluate(clouds, {"pca-16": pca_method(16)}, rotate="so3")
    assert rep["table"]["pca-16"]["given"] < 0.01
    assert rep["table"]["pca-16"]["none"] < 0.5


def test_eval_rotation_fa_unchanged_no_fa_reported(tmp_path):
    torch.manual_seed(0)
    shapes = procedural_shapes(("cube", "cylinder"))
    clouds = build_clouds(shapes, columns=("none", "0.6%"), points=6000, queries=300)
    fa = NormalNet(NormalNetConfig(k_near=16, k_far=16, far_stride=4)).eval()
    torch.manual_seed(0)
    nofa = NormalNet(NormalNetConfig(k_near=16, k_far=16, far_stride=4, fa=False)).eval()
    # an untrained weight net is a fine stand-in: equivariance does not depend on training
    res = {rot: evaluate(clouds, {"fa": model_method(fa, device="cpu"),
                                  "no-fa": model_method(nofa, device="cpu")}, rotate=rot)
           for rot in ("none", "so3")}
    d_fa = abs(res["so3"]["avg"]["fa"] - res["none"]["avg"]["fa"])
    d_nofa = abs(res["so3"]["avg"]["no-fa"] - res["none"]["avg"]["no-fa"])
    assert d_fa < 0.01, d_fa
    assert d_nofa > d_fa


def test_cli_train_and_eval_json(tmp_path):
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "--out", str(run), "--epochs", "1", "--steps-per-epoch",
                            "5", "--points", "3000", "--batch-size", "32", "--noise", "0",
                            "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout[r.stdout.index("{"):])["step"] == 5
    (tmp_path / "t.obj").write_text(
        "v 0 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\nf 1 3 2\nf 1 2 4\nf 1 4 3\nf 2 3 4\n")
    r = runner.invoke(app, ["eval", str(tmp_path / "t.obj"), "--model", str(run), "--points",
                            "3000", "--queries", "100", "--columns", "none", "--pca-k", "16,32",
                            "--json", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert set(rep["table"]) == {"fa", "pca-16", "pca-32", "pca-best"}
    assert rep["best_k"]["none"] in (16, 32)


def test_ddp_two_processes_gloo_identical_weights(tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", "29517", "-m", "fapc", "train", "--out", str(run), "--device",
           "cpu", "--epochs", "1", "--steps-per-epoch", "6", "--points", "3000",
           "--batch-size", "32", "--noise", "0"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    ranks = json.loads((run / "ddp_ranks.json").read_text())
    assert ranks["world_size"] == 2
    assert ranks["digests"][0] == ranks["digests"][1]


def test_eval_plots(tmp_path):
    torch.manual_seed(0)
    run = tmp_path / "m.safetensors"
    save_model(run, NormalNet(NormalNetConfig(k_near=16, k_far=16, far_stride=4)))
    (tmp_path / "t.obj").write_text(
        "v 0 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\nf 1 3 2\nf 1 2 4\nf 1 4 3\nf 2 3 4\n")
    r = runner.invoke(app, ["eval", str(tmp_path / "t.obj"), "--model", str(run), "--points",
                            "3000", "--queries", "200", "--columns", "none,0.6%", "--pca-k",
                            "16", "--plots", str(tmp_path / "plots"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    names = sorted(os.listdir(tmp_path / "plots"))
    assert names == ["hist_0.6pct.png", "hist_none.png", "t_0.6pct_error.png",
                     "t_none_error.png"]


@pytest.mark.parametrize("backbone", ["pointnet", "dgcnn"])
def test_shape_mode_trains_saves_and_is_rotation_invariant(tmp_path, backbone):
    run = tmp_path / backbone
    r = runner.invoke(app, ["train", "--out", str(run), "--mode", "shape", "--backbone",
                            backbone, "--shape-points", "128", "--epochs", "2",
                            "--steps-per-epoch", "3", "--batch-size", "4", "--noise", "0",
                            "--points", "2000"])
    assert r.exit_code == 0, r.output
    model, info = load_model(run)
    assert info["config"].kind == "shape" and info["config"].backbone == backbone
    shapes = procedural_shapes(("cube", "cylinder"))
    clouds = build_clouds(shapes, columns=("none",), points=3000, queries=256)
    res = {rot: evaluate(clouds, {"fa": model_method(model, device="cpu")}, rotate=rot)
           for rot in ("none", "so3", "o3")}
    assert abs(res["so3"]["avg"]["fa"] - res["none"]["avg"]["fa"]) < 0.01
    assert abs(res["o3"]["avg"]["fa"] - res["none"]["avg"]["fa"]) < 0.01


def _rotation(rng: np.random.Generator) -> torch.Tensor:
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return torch.from_numpy(q * np.sign(np.linalg.det(q)))


@pytest.mark.parametrize("options", [{}, {"refine": 2, "gate": True},
                                     {"near_features": True, "refine": 1, "fit": "pca"},
                                     {"refine": 2, "gate": True, "k_ext": 8},
                                     {"refine": 2, "gate": True, "k_ext": 8, "wide_stride": 8}])
def test_normal_net_variants_are_rotation_and_permutation_equivariant(options):
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    net = NormalNet(NormalNetConfig(k_near=16, k_far=16, **options)).double().eval()
    if options.get("k_ext"):
        with torch.no_grad():  # an outer ring that counts, with a per-patch part
            net.ring_bias.fill_(0.5)
            net.backbone.global_out.weight.normal_()
    if options.get("wide_stride"):
        with torch.no_grad():  # a wide summary that counts
            net.wide_log_weight.fill_(1.0)
    k_ext = options.get("k_ext", 0)
    wide = 6 if options.get("wide_stride") else 0
    x = torch.from_numpy(rng.normal(size=(64, 32 + k_ext + wide, 3)) * [1.0, 0.7, 0.2])
    rot = _rotation(rng)
    perm = torch.cat([torch.randperm(16), 16 + torch.randperm(16),  # within each scale
                      32 + torch.randperm(k_ext), 32 + k_ext + torch.randperm(wide)])
    a = net(x)["normal"]
    b = net(x[:, perm] @ rot.T)["normal"]
    assert ((a @ rot.T * b).sum(-1).abs() - 1).abs().max() < 1e-9
    plain = NormalNet(NormalNetConfig(k_near=16, k_far=16, fa=False, **options)).double().eval()
    with torch.no_grad():  # sharper weights than an untrained net's, so the pose shows
        plain.backbone.out.weight.mul_(50)
    c, d = plain(x)["normal"], plain(x @ rot.T)["normal"]
    assert ((c @ rot.T * d).sum(-1).abs() - 1).abs().max() > 1e-3


def test_robust_passes_pull_a_crease_patch_onto_the_query_face():
    # a patch at a 90-degree crease: 3/4 of it on the query's face z = 0, 1/4 on x = 0.3
    rng = np.random.default_rng(0)
    face = np.column_stack([rng.uniform(-1, 0.3, 48), rng.uniform(-1, 1, 48), np.zeros(48)])
    wall = np.column_stack([np.full(16, 0.3), rng.uniform(-1, 1, 16), rng.uniform(0, 1.3, 16)])
    pts = torch.from_numpy(np.concatenate([face[:24], wall[:8], face[24:], wall[8:]]))[None]
    errors = []
    for refine in (0, 3):
        net = NormalNet(NormalNetConfig(k_near=32, k_far=32, fit="pca", refine=refine)).double()
        with torch.no_grad():  # constant weights: what the fit itself does
            net.backbone.out.weight.zero_()
            net.backbone.out.bias.fill_(5.0)
            n = net(pts)["normal"][0]
        errors.append(float(torch.rad2deg(torch.arccos(n[2].abs().clamp(max=1)))))
    assert errors[0] > 10 and errors[1] < errors[0] / 3, errors


def test_ema_weights_are_validated_saved_and_resumed(tmp_path):
    run = str(tmp_path / "run")
    cfg = dict(epochs=4, steps_per_epoch=10, ema=0.9, **TINY)
    train(TrainConfig(out=run, max_steps=20, **cfg))
    state = torch.load(os.path.join(run, "state.pt"), weights_only=True)
    saved, _ = load_model(os.path.join(run, "last.safetensors"))
    for key, value in saved.state_dict().items():
        assert torch.equal(value, state["ema"][key])
    assert any(not torch.equal(state["ema"][k], state["raw"][k]) for k in state["raw"])
    train(TrainConfig(out=run, **cfg), resume=True)
    assert [int(r["step"]) for r in _log(run)] == [10, 20, 30, 40]


def test_warm_start_takes_the_weights_and_refuses_other_widths(tmp_path):
    base = str(tmp_path / "base")
    train(TrainConfig(out=base, epochs=1, steps_per_epoch=5, **TINY))
    start, _ = load_model(os.path.join(base, "last.safetensors"))
    run = str(tmp_path / "run")  # a wider far scale: the weights do not depend on K
    cfg = {**TINY, "lr": 1e-12, "k_far": 24}
    train(TrainConfig(out=run, epochs=1, steps_per_epoch=2, init=os.path.join(base, "last.safetensors"),
                      **cfg))
    warm, _ = load_model(os.path.join(run, "last.safetensors"))
    assert warm.config.k_far == 24
    for key, value in start.state_dict().items():
        torch.testing.assert_close(warm.state_dict()[key], value, atol=1e-6, rtol=0)
    with pytest.raises(FapcError, match="cannot start"):
        train(TrainConfig(out=str(tmp_path / "bad"), epochs=1, steps_per_epoch=1, widths=(8, 16),
                          init=os.path.join(base, "last.safetensors"), **TINY))


def _grown(tmp_path, **extra):
    """A small model with a gate and a robust pass (2 per-patch outputs), and the same model
    warm-started into ``extra`` settings (at a learning rate too small to move it)."""
    base = str(tmp_path / "base")
    cfg = {**TINY, "refine": 1, "gate": True}
    train(TrainConfig(out=base, epochs=1, steps_per_epoch=3, **cfg))
    start, _ = load_model(os.path.join(base, "last.safetensors"))
    run = str(tmp_path / "run")
    train(TrainConfig(out=run, epochs=1, steps_per_epoch=2, init=os.path.join(base, "last.safetensors"),
                      **{**cfg, "lr": 1e-12, **extra}))
    grown, _ = load_model(os.path.join(run, "last.safetensors"))
    return start, grown


def test_outer_ring_joins_the_fit_and_a_warm_start_grows_into_it(tmp_path):
    start, grown = _grown(tmp_path, k_ext=8)
    assert grown.config.k_ext == 8 and grown.config.patch.size == 40
    old_out = start.backbone.global_out
    new_out = grown.backbone.global_out
    assert new_out.weight.shape[0] == old_out.weight.shape[0] + 2
    torch.testing.assert_close(new_out.weight[:2], old_out.weight, atol=1e-6, rtol=0)
    assert new_out.weight[2:].abs().max() < 1e-6  # the ring's per-patch rows start at zero
    # the ring changes the normal once it has weight, and not the network's own weights
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(32, 40, 3)) * [1.0, 1.0, 0.1]).float()
    x[:, 32:, 2] += 0.5 * x[:, 32:, 0]  # a ring that tilts away from the inner plane
    with torch.no_grad():
        off = grown(x)
        grown.ring_bias.fill_(4.0)
        on = grown(x)
    torch.testing.assert_close(off["weights"], on["weights"])
    assert angle_deg(off["normal"].numpy(), on["normal"].numpy()).mean() > 1.0
    with pytest.raises(ValueError, match=r"\(B, 40, 3\)"):
        grown(x[:, :32])


def test_wide_summary_joins_the_plane_fit_only_and_a_warm_start_grows_into_it(tmp_path):
    start, grown = _grown(tmp_path, wide_stride=8, k_wide=16)
    assert grown.config.wide_stride == 8 and grown.config.patch.size == 38
    new_out = grown.backbone.global_out
    torch.testing.assert_close(new_out.weight[:2], start.backbone.global_out.weight, atol=1e-6,
                               rtol=0)
    assert new_out.weight[2:].abs().max() < 1e-6  # the summary's per-patch row starts at zero
    # a tilted wide summary turns the plane fit's normal once it weighs; the gate picks the plane
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(32, 38, 3)) * [1.0, 1.0, 0.05]).float()
    x[:, 32:, 2] = 0.5 * x[:, 32:, 0]  # the summary: points of a tilted plane
    with torch.no_grad():
        grown.backbone.global_out.bias[0] = -30.0  # gate fully on the plane fit
        light = grown(x)
        grown.wide_log_weight.fill_(8.0)
        heavy = grown(x)
        grown.backbone.global_out.bias[0] = 30.0  # gate fully on the quadratic fit
        jet = grown(x)
    torch.testing.assert_close(light["weights"], heavy["weights"])
    assert angle_deg(light["normal"].numpy(), heavy["normal"].numpy()).mean() > 5.0
    tilt = torch.tensor([-0.5, 0.0, 1.0]) / np.sqrt(1.25)
    assert angle_deg(heavy["normal"].numpy(), tilt.expand(32, 3).numpy()).max() < 1.0
    # the quadratic fit does not take the summary's rows (only its axes come from the plane
    # fit): the 27-degree tilt moves it by a few degrees at most
    with torch.no_grad():
        grown.wide_log_weight.fill_(-20.0)
        jet_light = grown(x)
    assert angle_deg(jet["normal"].numpy(), jet_light["normal"].numpy()).max() < 3.0


def test_cli_fine_tunes_the_shipped_model(tmp_path):
    from fapc.models.checkpoint import DEFAULT_MODEL

    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "--init", str(DEFAULT_MODEL), "--out", str(run), "--epochs",
                            "1", "--steps-per-epoch", "3", "--points", "3000", "--batch-size",
                            "16", "--noise", "0", "--lr", "1e-12"])
    assert r.exit_code == 0, r.output
    tuned, _ = load_model(run / "last.safetensors")
    shipped, _ = load_model(DEFAULT_MODEL)
    assert tuned.config.refine == shipped.config.refine and tuned.config.gate == shipped.config.gate
    # the shipped near scale for noiseless clouds was measured for its own weights only
    assert shipped.config.clean_k_near == 16 and tuned.config.clean_k_near == 0
    assert shipped.config.edge_k_near == 20 and tuned.config.edge_k_near == 0  # not copied
    for key, value in shipped.state_dict().items():
        torch.testing.assert_close(tuned.state_dict()[key], value, atol=1e-6, rtol=0)


def test_jet_normal_does_not_depend_on_how_the_tangent_axes_turn():
    from fapc.models.fits import jet_normal

    rng = np.random.default_rng(4)
    uv = rng.uniform(-1, 1, size=(16, 40, 2))
    h = 0.3 * uv[..., 0] ** 2 - 0.5 * uv[..., 0] * uv[..., 1] + 0.1 * uv[..., 1] + 0.2
    pts = torch.from_numpy(np.concatenate([h[..., None], uv], -1))  # (B, K, 3): h, u, v
    rot = _rotation(rng)
    pts = pts @ rot.T
    axes = rot.expand(16, 3, 3)
    w = torch.from_numpy(rng.uniform(0.1, 1, size=(16, 40)))
    ref = jet_normal(pts, w, axes)
    for theta in (0.3, 1.1, 2.0):
        c, s = np.cos(theta), np.sin(theta)
        turn = torch.tensor([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=torch.float64)
        for flip in (1.0, -1.0):  # a turn and a turn with a reflection of (u, v)
            turned = axes @ (turn @ torch.diag(torch.tensor([1.0, 1.0, flip], dtype=torch.float64)))
            got = jet_normal(pts, w, turned)
            assert ((ref * got).sum(-1).abs() - 1).abs().max() < 1e-12


def test_validation_shapes_by_name_or_by_seeded_share(tmp_path):
    shapes = procedural_shapes()
    names = sorted(s.name for s in shapes)
    tr, va = split_shapes(shapes, 0.25, 0, names=(names[0], names[3]))
    assert sorted(s.name for s in va) == [names[0], names[3]]
    assert {s.name for s in tr} == set(names) - {names[0], names[3]}
    tr2, va2 = split_shapes(shapes, 0.25, 0)  # seeded: the same share each time
    assert len(va2) == round(0.25 * len(shapes)) and [s.name for s in va2] == [
        s.name for s in split_shapes(shapes, 0.25, 0)[1]]
    with pytest.raises(FapcError, match="not among the training data"):
        split_shapes(shapes, 0.25, 0, names=("no-such-shape",))
    toml = tmp_path / "t.toml"
    toml.write_text(f'val_shapes = ["{names[1]}"]\n')
    assert TrainConfig.from_toml(str(toml)).val_shapes == (names[1],)


def test_worker_processes_build_distinct_batches_and_train_the_run(tmp_path):
    from fapc.train_data import PatchStream, batch_stream

    cfg = TrainConfig(out=str(tmp_path / "run"), epochs=2, steps_per_epoch=6, workers=2,
                      **TINY)
    shapes = procedural_shapes(("box", "cube"))
    spec = cfg.model_config().patch
    stream = iter(PatchStream(shapes, cfg, spec, seed=5))
    p, n, g = next(stream)
    assert p.shape == (cfg.batch_size, spec.size, 3) and n.shape == (cfg.batch_size, 3)
    assert g.shape == (cfg.batch_size,) and 0 <= int(g.min()) and int(g.max()) < 2 * len(cfg.noise)
    assert torch.allclose(n.norm(dim=1), torch.ones(cfg.batch_size), atol=1e-5)
    # two worker processes: each its own pool, so their first batches differ
    got = batch_stream(shapes, cfg, spec, seed=5, step=0, rank=0, pin=False)
    first, second = next(got), next(got)
    got.close()
    assert not torch.equal(first[0], second[0])
    # in-process batches are fixed by the seed
    a = next(batch_stream(shapes, replace(cfg, workers=0), spec, seed=5, step=0, rank=0, pin=False))
    b = next(batch_stream(shapes, replace(cfg, workers=0), spec, seed=5, step=0, rank=0, pin=False))
    assert torch.equal(a[0], b[0])
    train(cfg)
    assert [int(r["step"]) for r in _log(tmp_path / "run")] == [6, 12]
    with pytest.raises(FapcError, match="workers"):
        next(batch_stream(shapes, replace(cfg, workers=-1), spec, seed=5, step=0, rank=0,
                          pin=False))


def test_time_limit_ends_the_run_validated_saved_and_annealed(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "run"), epochs=1000, steps_per_epoch=1000,
                      time_limit=3.0, **TINY)
    train(cfg)
    rows = _log(tmp_path / "run")
    assert len(rows) == 1  # stopped long before the first epoch's end: one final row
    assert 0 < int(rows[0]["step"]) < 1000
    assert float(rows[0]["lr"]) < 0.05 * cfg.lr  # the cosine ran its course with the clock
    assert (tmp_path / "run" / "best.safetensors").exists()


def test_patch_bank_holds_the_builders_patches_and_trains(tmp_path):
    from fapc.patches import PatchBuilder
    from fapc.train_data import Pool

    cfg = TrainConfig(out=str(tmp_path / "run"), epochs=2, steps_per_epoch=5, bank=50, **TINY)
    spec = cfg.model_config().patch
    pool = Pool(procedural_shapes(("box", "cube")), cfg, spec, seed=3)
    pool.refresh(0)
    cloud = pool.items[0]
    bank_p, bank_n = cloud.bank
    assert bank_p.shape == (50, spec.size, 3) and bank_n.shape == (50, 3)
    assert cloud.builder is None  # the cloud's kD-trees are not kept
    # the bank rows are the patches of the cloud's own points: rebuild one cloud and compare
    ref = Pool(procedural_shapes(("box", "cube")), replace(cfg, bank=0), spec, seed=3)
    ref.refresh(0)
    rebuilt = ref.items[0]
    assert isinstance(rebuilt.builder, PatchBuilder)
    q = np.random.default_rng([3, 0, 2]).choice(rebuilt.good, size=50, replace=False)
    np.testing.assert_array_equal(rebuilt.builder.patches(q)[0], bank_p)
    np.testing.assert_array_equal(rebuilt.normals[q].astype(np.float32), bank_n)
    p, n, g = pool.batch(np.random.default_rng(0), 64)  # more than a bank holds: with repeats
    assert p.shape == (64, spec.size, 3) and n.shape == (64, 3)
    # each patch carries its cloud's group: shape index x noise levels + level
    assert set(g.tolist()) == {c.group for c in pool.items}
    train(cfg)
    assert [int(r["step"]) for r in _log(tmp_path / "run")] == [5, 10]


@pytest.mark.parametrize("loss", ["rmse", "sin", "sin2", "sq"])
def test_each_loss_trains_and_unknown_losses_are_refused(tmp_path, loss):
    cfg = TrainConfig(out=str(tmp_path / "run"), epochs=2, steps_per_epoch=8, loss=loss, **TINY)
    torch.manual_seed(cfg.seed)  # the run's initial weights, on the run's validation shapes
    first = evaluate_patches(cfg.build_model(), validation_set(
        procedural_shapes()[:2], cfg, cfg.model_config().patch), torch.device("cpu"))
    train(cfg)
    rows = _log(tmp_path / "run")
    assert [int(r["step"]) for r in rows] == [8, 16]
    assert all(math.isfinite(float(r["train_loss"])) for r in rows)
    assert float(rows[-1]["val_rmse"]) < first["val_rmse"]
    with pytest.raises(FapcError, match="loss"):
        train(replace(cfg, loss="l3", out=str(tmp_path / "bad")))


def test_noise_between_the_levels_and_cloud_sizes_are_drawn_and_grouped():
    from fapc.train_data import draw_noise, draw_points, group_id

    cfg = TrainConfig(noise=(0.0, 0.00125, 0.006, 0.012), noise_spread=0.5, noise_low=0.0002,
                      points=100_000, points_low=20_000)
    rng = np.random.default_rng(0)
    noise = np.array([draw_noise(rng, cfg) for _ in range(4000)])
    on_levels = np.isin(noise, cfg.noise)
    assert 0.45 < on_levels.mean() < 0.55  # half on the levels, half between
    between = noise[~on_levels]
    assert between.min() >= 0.0002 and between.max() <= 0.012
    # log-uniform: as many below the geometric middle of the range as above it
    assert 0.45 < (between < np.sqrt(0.0002 * 0.012)).mean() < 0.55
    sizes = np.array([draw_points(rng, cfg) for _ in range(2000)])
    assert sizes.min() >= 20_000 and sizes.max() <= 100_000
    assert 0.45 < (sizes < np.sqrt(20_000 * 100_000)).mean() < 0.55
    # the levels keep their groups; a noise between them joins the nearest level (log scale)
    assert [group_id(2, lv, cfg) for lv in cfg.noise] == [8, 9, 10, 11]
    assert group_id(0, 0.00005, cfg) == 0 and group_id(0, 0.0005, cfg) == 1
    assert group_id(0, 0.003, cfg) == 2 and group_id(0, 0.009, cfg) == 3
    # off by default: only the levels, and the configured size, and no extra draws
    plain = TrainConfig()
    a, b = np.random.default_rng(1), np.random.default_rng(1)
    assert [draw_noise(a, plain) for _ in range(50)] == [float(b.choice(plain.noise)) for _ in range(50)]
    assert draw_points(a, plain) == plain.points and a.random() == b.random()


def test_training_with_noise_between_levels_and_varied_sizes_runs_and_bad_settings_are_refused(
        tmp_path):
    from fapc.train_data import Pool

    cfg = TrainConfig(out=str(tmp_path / "run"), epochs=1, steps_per_epoch=6, **TINY,
                      noise_spread=1.0, noise_low=0.0005, points_low=1500)
    pool = Pool(procedural_shapes(("sphere", "box")), cfg, cfg.model_config().patch, seed=1)
    pool.refresh(0)
    sizes = [len(c.normals) for c in pool.items]
    assert all(1500 <= n <= 4000 for n in sizes) and len(set(sizes)) > 1
    train(cfg)
    assert [int(r["step"]) for r in _log(tmp_path / "run")] == [6]
    for bad, match in ((dict(noise_spread=1.5), "noise_spread"),
                       (dict(noise_spread=0.5, noise_low=0.01), "noise_low"),
                       (dict(points_low=9000), "points_low")):
        with pytest.raises(FapcError, match=match):
            train(replace(cfg, out=str(tmp_path / "bad"), **bad))


@pytest.mark.parametrize("bad,match", [
    (dict(epochs=0), "epochs"), (dict(steps_per_epoch=-1), "steps_per_epoch"),
    (dict(batch_size=0), "batch_size"), (dict(max_steps=0), "max_steps"),
    (dict(lr=0.0), "lr"), (dict(val_fraction=1.0), "val_fraction"),
    (dict(outliers=-0.1), "outliers"), (dict(group="SO2"), "group"),
    (dict(workers=-1), "workers"), (dict(device="tpu"), "device"),
])
def test_settings_a_run_cannot_use_are_refused_before_any_output(tmp_path, bad, match):
    cfg = TrainConfig(out=str(tmp_path / "run"), epochs=1, steps_per_epoch=2, **TINY)
    with pytest.raises(FapcError, match=match):
        train(replace(cfg, **bad))
    assert not (tmp_path / "run").exists()


def test_cli_refuses_bad_settings_with_one_line_and_exit_2(tmp_path):
    mesh = tmp_path / "cube.ply"
    from fapc.cloud import PointCloud
    from fapc.io import write_cloud

    v = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], float)
    f = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                  [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]])
    write_cloud(mesh, PointCloud(points=v, faces=f))
    cases = [
        ("train", str(mesh), "--out", str(tmp_path / "run"), "--epochs", "-1"),
        ("train", str(mesh), "--out", str(tmp_path / "run"), "--loss", "l3"),
        ("sample", str(mesh), "-o", str(tmp_path / "s"), "-n", "0"),
        ("sample", str(mesh), "-o", str(tmp_path / "s"), "--noise", "-0.01"),
        ("sample", str(mesh), "-o", str(tmp_path / "s"), "--format", "obj"),
        ("eval", str(mesh), "--columns", "loud"),
        ("eval", str(mesh), "--pca-k", "abc"),
        ("eval", str(mesh), "--draws", "0"),
        ("bench", "--points", "12x"),
    ]
    for args in cases:
        r = runner.invoke(app, list(args), catch_exceptions=False)
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert r.exit_code == 2 and len(lines) == 1, (args, r.stderr)
        assert "Traceback" not in r.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "s").exists()
    # a missing input of a batch is one line; the other meshes are still sampled
    r = runner.invoke(app, ["sample", str(tmp_path / "nothing.ply"), str(mesh), "-o",
                            str(tmp_path / "s"), "-n", "500"], catch_exceptions=False)
    assert r.exit_code == 1 and "nothing.ply: no such file" in r.stderr
    assert os.listdir(tmp_path / "s") == ["cube.ply"]
    # a run directory that cannot be made is one line, not a traceback
    r = runner.invoke(app, ["train", str(mesh), "--out", str(mesh / "run"), "--epochs", "1"],
                      catch_exceptions=False)
    assert r.exit_code == 1 and "cannot create the run directory" in r.stderr
