"""The learned consensus step: equivariance (float64, e3nn style), training that learns, the
shipped weights and where the pipeline uses them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import angle_deg, plane_points
from scipy.spatial import cKDTree
from scipy.stats import special_ortho_group

from fapc.consensus import consensus_normals, spread
from fapc.models.consensus_net import (
    PAIR_FEATURES,
    QUERY_FEATURES,
    ConsensusNet,
    ConsensusNetConfig,
)
from fapc.patches import PatchSpec
from fapc.pca import pca_normals
from fapc.train_consensus import cloud_inputs, evaluate, train_net


def _noisy_sphere(n: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return d + rng.normal(scale=noise, size=(n, 3)), d  # points, true normals


def _consensus(points: np.ndarray, normals: np.ndarray, query: np.ndarray, net: ConsensusNet
               ) -> np.ndarray:
    p, n = torch.from_numpy(points), torch.from_numpy(normals)
    nb = torch.from_numpy(cKDTree(points).query(points, 48)[1])  # (N, 48), the point first
    sp = spread(p, n, torch.arange(len(p)), nb[:, :12])
    q = torch.from_numpy(query)
    with torch.no_grad():
        out, _, t = consensus_normals(p, n, sp, query=q, candidates=nb[q], support=nb[q, :24],
                                      smoother=net, n_near=24)
    assert t.mean() > 0.9  # noisy enough that the learned step runs at most queries
    return out.numpy()


@pytest.mark.parametrize("output,face,context", [("eig", False, False), ("mean", False, False),
                                                 ("mean", True, True), ("mean", True, False)])
def test_learned_consensus_is_equivariant_and_permutation_invariant(output: str, face: bool,
                                                                    context: bool):
    torch.manual_seed(0)
    net = ConsensusNet(ConsensusNetConfig(hidden=8, output=output, face=face,
                                          context=context)).double().eval()
    pts, _ = _noisy_sphere(1500, 0.03, seed=1)
    nrm = pca_normals(pts, k=12)[0].astype(np.float64)
    q = np.arange(0, 1500, 7)
    ref = _consensus(pts, nrm, q, net)
    rng = np.random.default_rng(2)
    for det in (1, -1):  # rotations, and rotations with a reflection
        r = special_ortho_group.rvs(3, random_state=rng) * np.array([1, 1, det])
        t = rng.normal(size=3) * 10
        perm = rng.permutation(len(pts))
        inv = np.argsort(perm)
        got = _consensus(pts[perm] @ r.T + t, nrm[perm] @ r.T, inv[q], net)
        err = angle_deg(ref @ r.T, got)
        assert err.max() < 1e-5, err.max()  # arccos near 1 resolves ~1e-6 deg in float64


def _uniform_net(output: str) -> ConsensusNet:
    """A net whose last layers are zero: every candidate and the query weigh alike."""
    net = ConsensusNet(ConsensusNetConfig(hidden=8, output=output)).double().eval()
    with torch.no_grad():
        for head in (net.pair[-1], net.own[-1]):
            head.weight.zero_()
            head.bias.zero_()
    return net


def test_output_rules_on_two_directions_with_mixed_signs():
    """Uniform weights over the query (direction a) and 64 candidates: 48 along a, 16 along b
    at 60 degrees to it, signs mixed. The top eigenvector of sum n n^T and the sign-aligned
    mean sit at their closed-form angles from a (9.34 and 13.67 degrees); a mean that did
    not turn the signs would cancel to nothing."""
    a = np.array([0.0, 0.0, 1.0])
    b = np.array([np.sin(np.radians(60.0)), 0.0, np.cos(np.radians(60.0))])
    sa = np.where(np.arange(48) % 2 == 0, 1.0, -1.0)[:, None]
    sb = np.where(np.arange(16) % 2 == 0, 1.0, -1.0)[:, None]
    nj = torch.from_numpy(np.concatenate([a * sa, b * sb])[None])  # (1, 64, 3)
    own = torch.from_numpy(a[None])
    pair = torch.zeros(1, 64, PAIR_FEATURES, dtype=torch.float64)
    query = torch.zeros(1, QUERY_FEATURES, dtype=torch.float64)
    with torch.no_grad():
        eig = _uniform_net("eig")(own, nj, pair, query).numpy()
        mean = _uniform_net("mean")(own, nj, pair, query).numpy()
    sin2, cos2 = 16 * np.sin(np.radians(120.0)), 49 + 16 * np.cos(np.radians(120.0))
    want_eig = np.degrees(0.5 * np.arctan2(sin2, cos2))  # the top eigenvector of the 2 x 2
    want_mean = np.degrees(np.arctan2(16 * np.sin(np.radians(60.0)),
                                      49 + 16 * np.cos(np.radians(60.0))))
    assert abs(angle_deg(eig, a[None])[0] - want_eig) < 1e-3, (eig, want_eig)
    assert abs(angle_deg(mean, a[None])[0] - want_mean) < 1e-6, (mean, want_mean)
    assert abs(want_mean - want_eig) > 4.0


def test_face_offsets_tell_which_face_of_a_crease_the_query_is_on():
    """Two faces meet at a right angle along the y axis; the query lies on face A (z = 0),
    0.6 spacings from the crease, with light noise. The offset of a face-B candidate's face
    is the query's distance to plane B (0.6 spacings), an A candidate's only the noise;
    a distance to one noisy candidate's own plane scatters with that point's noise."""
    from fapc.models.consensus_net import face_features

    rng = np.random.default_rng(0)
    g = np.stack(np.meshgrid(np.arange(-4.0, 4.5), np.arange(-4.0, 4.5)), -1).reshape(-1, 2)
    on_a = np.c_[-np.abs(g[:, 0]), g[:, 1], np.zeros(len(g))]  # x <= 0, z = 0
    on_b = np.c_[np.zeros(len(g)), g[:, 1], -np.abs(g[:, 0])]  # x = 0, z <= 0
    pts = np.concatenate([on_a, on_b])
    pts = pts + rng.normal(scale=0.1, size=pts.shape)
    normals = np.concatenate([np.tile([0.0, 0, 1], (len(g), 1)), np.tile([1.0, 0, 0], (len(g), 1))])
    query = np.array([-0.6, 0.0, 0.0])
    take = np.argsort(np.linalg.norm(pts - query, axis=1))[:64]
    rel = torch.from_numpy(pts[take] - query)[None]  # (1, 64, 3)
    nj = torch.from_numpy(normals[take])[None]
    own = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    pair, mine = face_features(rel, nj, own, torch.ones(1, dtype=torch.float64), sin2=0.02)
    off = np.exp(pair[0, :, 0].numpy())  # back from the log (+1e-3)
    is_b = normals[take, 0] > 0.5
    assert 10 < is_b.sum() < 54
    assert off[is_b].min() > 0.45 and off[~is_b].max() < 0.1, (off[is_b], off[~is_b])
    assert np.exp(mine[0, 0].item()) < 0.1  # the query's own normal: face A
    share = pair[0, :, 1].numpy()  # each face's share of the patch
    np.testing.assert_allclose(share[~is_b], (~is_b).sum() / 65 + 1 / 65, atol=1e-6)
    single = np.abs((rel[0] * nj[0]).sum(-1).numpy())  # through the candidate's own point
    assert single[~is_b].max() > 2 * off[~is_b].max()  # one noisy point's plane: its noise
    none = face_features(rel[:0], nj[:0], own[:0], torch.ones(0, dtype=torch.float64), sin2=0.02)
    assert none[0].shape == (0, 64, 2) and none[1].shape == (0, 2)  # no query: nothing to do


def test_output_rule_and_loss_are_checked():
    with pytest.raises(ValueError, match="output"):
        ConsensusNetConfig(output="median")
    with pytest.raises(ValueError, match="face_sin2"):
        ConsensusNetConfig(face_sin2=0.0)
    net = ConsensusNet(ConsensusNetConfig(hidden=8, face=True))
    with pytest.raises(ValueError, match="pair"):  # features without the face offsets
        net(torch.zeros(2, 3), torch.zeros(2, 5, 3), torch.zeros(2, 5, PAIR_FEATURES),
            torch.zeros(2, QUERY_FEATURES))
    with pytest.raises(ValueError, match="loss"):
        train_net([], config=ConsensusNetConfig(), epochs=1, lr=1e-3, batch=8, seed=0,
                  loss="l1")


def test_a_plain_weighting_of_raw_coordinates_is_not_equivariant():
    # the same normal average, weighted by an MLP of raw relative coordinates: moves with the
    # pose, so the features must be invariant for the step to be
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    pts, _ = _noisy_sphere(800, 0.03, seed=3)
    nrm = torch.from_numpy(pca_normals(pts, k=12)[0].astype(np.float64))
    nb = torch.from_numpy(cKDTree(pts).query(pts, 24)[1])

    def plain(points: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
        rel = points[nb] - points[:, None]
        w = torch.softmax(mlp(rel).squeeze(-1), 1)  # (N, 24)
        m = (normals[nb] * w[..., None]).transpose(1, 2) @ normals[nb]
        return torch.linalg.eigh(m)[1][..., 2]

    r = torch.from_numpy(special_ortho_group.rvs(3, random_state=4))
    p = torch.from_numpy(pts)
    with torch.no_grad():
        err = angle_deg((plain(p, nrm) @ r.T).numpy(), plain(p @ r.T, nrm @ r.T).numpy())
    assert np.median(err) > 0.01


@pytest.mark.parametrize("face_and_context", [False, True])
def test_training_learns_to_beat_its_input(face_and_context: bool):
    spec = PatchSpec(k_near=16, k_far=16, far_stride=4, far_smooth=1)
    config = ConsensusNetConfig(hidden=8, face=face_and_context, context=face_and_context)

    def cloud(seed: int) -> dict:
        pts, gt = _noisy_sphere(6000, 0.02, seed=seed)
        nrm = pca_normals(pts, k=10)[0].astype(np.float64)  # noisy "network" normals
        q = np.arange(0, 6000, 3)
        c = cloud_inputs(pts, nrm, gt, q, spec=spec, face_sin2=config.face_width)
        c["level"] = "sphere"
        return c

    train, val = [cloud(10), cloud(11)], [cloud(12)]
    assert float(val[0]["gate"].float().mean()) > 0.9
    own = float(np.sqrt(np.mean(angle_deg(val[0]["own"].numpy(), val[0]["gt"].numpy()) ** 2)))
    net = train_net(train, config=config, epochs=3, lr=1e-2, batch=512, seed=0)
    learned = evaluate(net, val)["sphere"][1]
    assert learned < 0.8 * own, (learned, own)


def test_shipped_consensus_model_loads_and_runs_only_on_noisy_data(monkeypatch):
    import fapc.consensus_batches as batches_mod
    from fapc.models.checkpoint import CONSENSUS_MODEL, load_model
    from fapc.normals import estimate_normals

    if not CONSENSUS_MODEL.exists():
        pytest.skip("no shipped consensus model")
    net, info = load_model(CONSENSUS_MODEL)
    assert isinstance(net, ConsensusNet) and info["fapc_version"]
    noisy, _ = _noisy_sphere(4000, 0.02, seed=5)
    clean, _ = _noisy_sphere(4000, 0.0, seed=6)
    learned = [estimate_normals(c, device="cpu").normals for c in (noisy, clean)]
    monkeypatch.setattr(batches_mod, "consensus_model", lambda device, path=None: None)
    fixed = [estimate_normals(c, device="cpu").normals for c in (noisy, clean)]
    assert angle_deg(learned[0], fixed[0]).max() > 0.1  # the learned step ran on noisy data
    np.testing.assert_array_equal(learned[1], fixed[1])  # clean data: its gate stays shut
    from fapc.models.checkpoint import HEAVY_CONSENSUS_MODEL

    if HEAVY_CONSENSUS_MODEL.exists():  # the heavy-noise set: the face and context design
        heavy, info = load_model(HEAVY_CONSENSUS_MODEL)
        assert isinstance(heavy, ConsensusNet) and info["fapc_version"]
        assert heavy.config.face and heavy.config.context


def test_heavy_noise_weights_are_taken_on_heavily_noisy_clouds_only(tmp_path, monkeypatch):
    """Where the package holds heavy-noise smoothing weights, a cloud whose noise figure
    reads heavy takes them instead of the default ones (the same as giving them), a lightly
    noisy or noiseless cloud does not, and a ``consensus_model`` given applies everywhere."""
    import fapc.models.checkpoint as checkpoint
    from fapc.models.checkpoint import CONSENSUS_MODEL, load_model, save_model
    from fapc.near_scale import choices_for
    from fapc.noise import noise_figure
    from fapc.normals import estimate_normals

    if not CONSENSUS_MODEL.exists():
        pytest.skip("no shipped consensus model")
    torch.manual_seed(1)
    other = ConsensusNet(load_model(CONSENSUS_MODEL)[0].config)  # untrained weights
    heavy_file = tmp_path / "consensus_heavy.safetensors"
    save_model(heavy_file, other)
    clean = plane_points(4000, seed=8)
    bump = np.random.default_rng(9).normal(size=4000)
    light = clean + np.column_stack([np.zeros((4000, 2)), 0.003 * bump])
    heavy = clean + np.column_stack([np.zeros((4000, 2)), 0.04 * bump])
    assert [noise_figure(p).level for p in (heavy, light, clean)] == ["heavy", "light", "none"]
    q = np.arange(300)

    def normals(points: np.ndarray, **kw) -> np.ndarray:
        return estimate_normals(points, device="cpu", query_index=q, **kw).normals

    monkeypatch.setattr(checkpoint, "HEAVY_CONSENSUS_MODEL", tmp_path / "missing.safetensors")
    before = {name: normals(p) for name, p in (("heavy", heavy), ("light", light))}
    net = load_model(None)[0]
    assert choices_for(heavy, net).smoother is None  # the package holds none: as before
    monkeypatch.setattr(checkpoint, "HEAVY_CONSENSUS_MODEL", heavy_file)
    assert choices_for(heavy, net).smoother == str(heavy_file)
    assert choices_for(light, net).smoother is None and choices_for(clean, net).smoother is None
    after = normals(heavy)
    assert angle_deg(after, before["heavy"]).max() > 0.1  # other weights ran
    np.testing.assert_array_equal(after, normals(heavy, consensus_model=heavy_file))
    np.testing.assert_array_equal(normals(light), before["light"])  # light: untouched
    given = normals(heavy, consensus_model=CONSENSUS_MODEL)  # a file given wins
    np.testing.assert_array_equal(given, before["heavy"])
    rot = special_ortho_group.rvs(3, random_state=3)
    assert choices_for(heavy @ rot.T + 9.0, net).smoother == str(heavy_file)  # pose-free


def test_own_consensus_model_is_used_and_bad_ones_are_refused(tmp_path, monkeypatch):
    """``consensus_model=`` swaps the learned smoothing's weights (a file or the directory
    ``train_consensus --out`` writes); a normal network given there, or a consensus model
    given as the network, is refused with a one-line error before any work."""
    import fapc.models.checkpoint as checkpoint
    from fapc.errors import FapcError
    from fapc.models.checkpoint import CONSENSUS_MODEL, DEFAULT_MODEL, load_model, save_model
    from fapc.normals import estimate_normals

    if not CONSENSUS_MODEL.exists():
        pytest.skip("no shipped consensus model")
    # the default weights on every cloud (not the heavy-noise ones, tested above)
    monkeypatch.setattr(checkpoint, "HEAVY_CONSENSUS_MODEL", tmp_path / "missing.safetensors")
    shipped, _ = load_model(CONSENSUS_MODEL)
    torch.manual_seed(0)
    other = ConsensusNet(shipped.config)  # same design, untrained weights
    save_model(tmp_path / "consensus.safetensors", other)
    noisy, _ = _noisy_sphere(3000, 0.02, seed=7)
    default = estimate_normals(noisy, device="cpu").normals
    same = estimate_normals(noisy, device="cpu", consensus_model=CONSENSUS_MODEL).normals
    np.testing.assert_array_equal(default, same)
    own = estimate_normals(noisy, device="cpu", consensus_model=tmp_path).normals  # a directory
    assert angle_deg(own, default).max() > 0.1
    off = estimate_normals(noisy, device="cpu", consensus=False,
                           consensus_model=tmp_path / "missing.safetensors").normals
    assert off.shape == default.shape  # not read when the consensus step is off
    with pytest.raises(FapcError, match="not a consensus-step model"):
        estimate_normals(noisy, device="cpu", consensus_model=DEFAULT_MODEL)
    with pytest.raises(FapcError, match="no such model file"):
        estimate_normals(noisy, device="cpu", consensus_model=tmp_path / "missing.safetensors")
    with pytest.raises(FapcError, match="not a normal network"):
        estimate_normals(noisy, device="cpu", model=CONSENSUS_MODEL)
