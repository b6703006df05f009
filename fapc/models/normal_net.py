"""The default normal estimator: an FA-invariant network that weights a local PCA fit.

For each query point, a two-scale patch (:mod:`fapc.patches`) is put into each of the 4
SO(3) frame elements of its covariance about the query. A small PointNet-style backbone
scores every neighbour (a logit per point, an invariant scalar); the logits are averaged over
the frame elements, turned into weights, and the normal is the smallest-eigenvalue
eigenvector of the weighted covariance. Because the weights are invariant and the weighted
fit is equivariant, the normal is exactly equivariant (up to the sign, which a normal does not
have), with no vector averaging that could cancel. With the default SO(3) frames (4
elements) the output is exactly rotation-equivariant; a reflected (mirrored) input is not
covered: the weights learned in the 4 rotation frames are not mirror-symmetric, and on a
noisy bumpy test shape a mirrored cloud's normals moved by a median 0.45 deg (up to 25 deg
at a few points) against the mirrored normals. ``group="O3"`` (all 8 elements, twice the
cost) makes it reflection-equivariant too.

Two optional steps sharpen the fit (``NormalNetConfig.refine`` and ``gate``): ``refine``
robust passes re-weight the points by their distance to the current weighted plane (a
Gaussian of the residual in units of the weighted RMS residual, its width set per patch by
the network), which pulls a patch at a crease onto the query's own face; the ``gate`` (an
invariant per-patch scalar) blends the plane fit's normal with the quadratic fit's, which
lets heavy noise fall back to the steadier plane. With ``k_ext`` the fits also take an outer
ring of far points that the network does not see (the patch's ``k_ext`` last rows): each gets
the weight ``sigmoid(a + b r)`` of its distance ``r`` to the query, with ``a`` and ``b`` set per
patch by the network, and then the same robust passes. Under heavy noise this widens the fit
to about twice the far scale's support at the cost of a few more products per query, not of
a larger network. With ``wide_stride`` the plane fits also take the patch's wide summary
(:func:`fapc.patches.wide_summary`: six pseudo-points carrying the mean and covariance of
about ``k_wide * wide_stride`` raw points), with one weight per patch, ``exp(c)``, ``c`` set by
the network; the robust passes leave those rows alone, and the quadratic fit does not take
them. All of these use invariant quantities only, so the normal stays exactly equivariant.

Outputs per query: ``normal (B, 3)``, ``confidence (B,)`` in [0, 1] (the patch's own,
:func:`fapc.confidence.patch_confidence`: how well the frame elements agree on the weights,
to the power 1/4, times the weighted fit's planarity; the pipeline multiplies in the
neighbours' agreement), ``curvature (B,)`` (surface variation of the weighted fit).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from fapc.confidence import patch_confidence
from fapc.frames import compute_frames
from fapc.models.fits import homogeneous, jet_normal, moment_fit, plane_residuals
from fapc.patches import PatchSpec

# Smallest RMS radius of the near scale, in units of the patch's (unit) RMS radius: a near
# scale of copies of one point (radius 0) would otherwise blow its features up to ~1e6.
NEAR_R_MIN = 1e-3


@dataclass
class NormalNetConfig:
    """Everything needed to rebuild the network (saved in the model file's metadata)."""

    k_near: int = 32
    k_far: int = 32
    far_stride: int = 6
    widths: tuple[int, ...] = (16, 32)
    head: int = 16
    group: str = "SO3"
    fa: bool = True
    fit: str = "jet2"
    near_features: bool = False
    far_smooth: int = 0
    refine: int = 0  # robust re-weighting passes of the fit (residual-based, see NormalNet)
    gate: bool = False  # blend the plane fit's and the quadratic fit's normals (learned, invariant)
    k_ext: int = 0  # outer ring of far points joining the fits, weighted per patch (see fit)
    wide_stride: int = 0  # wide summary of raw points in the plane fits (0: off; see fit)
    k_wide: int = 32  # cells pooled into the wide summary
    # near scale on noiseless clouds (0: k_near everywhere); fapc.near_scale.near_scale_for
    # chooses it by the cloud's noise figure, where no k is asked for
    clean_k_near: int = 0
    # near scale at points of high curvature (above edge_curvature) on lightly noisy clouds
    # (0: off); fapc.near_scale.near_scales_for turns it on by the cloud's noise figure
    edge_k_near: int = 0
    edge_curvature: float = 0.04
    # the light smoothing (fapc.light) by default on lightly noisy clouds whose scatter reads
    # as noise, not detail (noise figure's whiteness at least this; 0: only when asked for)
    light_whiteness: float = 0.0
    # draws of the far-scale subsample averaged on heavily noisy clouds and on noiseless
    # ones (fapc.fa_run's draws; 0 or 1: one); fapc.near_scale.draws_for_figure chooses
    # between them by the noise figure
    heavy_draws: int = 0
    clean_draws: int = 0
    # the plane vote (fapc.vote) as the consensus step's last pass on noiseless clouds without
    # scan lines; fapc.near_scale.vote_for_figure chooses it by the noise figure
    clean_vote: bool = False
    # exact planes (fapc.exact) after the draws on noiseless clouds without scan lines;
    # fapc.near_scale.exact_for_figure chooses them by the noise figure
    clean_exact: bool = False
    # where clean_exact turns them on, a change by fewer degrees is not made
    # (fapc.exact.ExactSettings.min_change; --exact-planes, forced, makes every change)
    exact_min_change: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def patch(self) -> PatchSpec:
        return PatchSpec(self.k_near, self.k_far, self.far_stride, self.far_smooth, self.k_ext,
                         self.wide_stride, self.k_wide)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> NormalNetConfig:
        return config_from_json(cls, text)


def config_from_json(cls: type, text: str) -> Any:
    """A config dataclass from its JSON: unknown keys ignored, lists back to tuples."""
    d = json.loads(text)
    known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in known.items()})


class WeightBackbone(nn.Module):
    """Per-point logits from local coordinates: ``(B', K, in_dim) -> (B', K)``.

    A shared MLP ``in_dim -> w0 -> w1``, a max-pooled patch feature, and a head that scores
    each point from its first-layer feature plus the patch feature. Not equivariant by
    itself: :class:`NormalNet` feeds it frame coordinates.
    """

    def __init__(self, in_dim: int = 4, widths: tuple[int, ...] = (16, 32), head: int = 16,
                 n_global: int = 0) -> None:
        super().__init__()
        w0, w1 = widths
        self.l1 = nn.Linear(in_dim, w0)
        self.l2 = nn.Linear(w0, w1)
        self.point = nn.Linear(w0, head, bias=False)
        self.glob = nn.Linear(w1, head)
        self.out = nn.Linear(head, 1)
        # optional per-patch scalars from the pooled feature (e.g. the fit gate)
        self.global_out = nn.Linear(w1, n_global) if n_global else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_first(self.l1(x))[0]

    def from_first(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rest of the network from the first layer's pre-activations ``(B', K, w0)``:
        per-point logits ``(B', K)`` and the per-patch outputs ``(B', n_global)`` (or None)."""
        h1 = pre.relu_()  # (B', K, w0)
        # max_K relu(h W^T + b) = relu(max_K(h W^T) + b): bias and ReLU after the pooling
        g = (torch.matmul(h1, self.l2.weight.t()).amax(dim=-2) + self.l2.bias).relu_()  # (B', w1)
        # under bf16 autocast only the widest product (above) runs in bf16: the per-point
        # head stays float32, as the robust passes and the gate amplify small logit changes
        with torch.autocast(device_type=h1.device.type, enabled=False):
            dtype = self.point.weight.dtype  # float32, or float64 in tests
            g = g.to(dtype)
            h = (self.point(h1.to(dtype)) + self.glob(g).unsqueeze(-2)).relu_()  # (B', K, head)
            extra = self.global_out(g) if self.global_out is not None else None
            return self.out(h).squeeze(-1), extra  # (B', K), (B', n_global)


class NormalNet(nn.Module):
    """Patches ``(B, K, 3)`` (centred on the query, unit RMS radius; the first ``k_near``
    rows the near scale) -> normal, confidence, curvature."""

    def __init__(self, config: NormalNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or NormalNetConfig()
        c = self.config
        # per-patch outputs, in this order: [gate] if c.gate, [log residual scale] if
        # c.refine, [ring offset, ring slope] if c.k_ext, [wide log-weight] if c.wide_stride
        self.global_index: dict[str, int] = {}
        n_global = 0
        for name, size in (("gate", int(c.gate)), ("scale", int(c.refine > 0)),
                           ("ring", 2 * int(c.k_ext > 0)), ("wide", int(c.wide_stride > 0))):
            if size:
                self.global_index[name] = n_global
                n_global += size
        self.backbone = WeightBackbone(7 if c.near_features else 4, c.widths, c.head,
                                       n_global=n_global)
        if c.refine:  # residual scale of the robust passes, in units of the weighted RMS residual
            self.refine_log_scale = nn.Parameter(torch.tensor(0.0))
        # the ring starts nearly off (weight ~0.02), the wide summary light (each row ~0.14
        # of a point), and their per-patch rows at zero: a model grown into them starts
        # where it was
        if c.k_ext:
            self.ring_bias = nn.Parameter(torch.tensor(-4.0))
            self.ring_slope = nn.Parameter(torch.tensor(0.0))
        if c.wide_stride:
            self.wide_log_weight = nn.Parameter(torch.tensor(-2.0))
        with torch.no_grad():
            for name, size in (("ring", 2), ("wide", 1)):
                if name in self.global_index:
                    rows = slice(self.global_index[name], self.global_index[name] + size)
                    self.backbone.global_out.weight[rows].zero_()
                    self.backbone.global_out.bias[rows].zero_()
        flags = torch.cat([torch.zeros(c.k_near), torch.ones(c.k_far)])
        self.register_buffer("scale_flags", flags, persistent=False)
        # bf16 autocast on the backbone's widest product (--precision bf16); frames, fits float32+
        # (cache_enabled=False: a CUDA graph may replay the forward pass, see fapc.cuda_graphs)
        self.use_bf16 = False
        # dtype of the weighted fits (None: the patches'); float64 on a CPU steadies the
        # robust passes against float32 rounding (fapc.normals sets it)
        self.fit_dtype: torch.dtype | None = None

    def with_near_scale(self, k_near: int) -> NormalNet:
        """This network with a near scale of ``k_near`` points: no weight depends on the
        patch's sizes (the backbone pools over the points), so a new module gets the same
        weights, on the same device, in the same mode (``self`` where ``k_near`` is its own).
        The weights learned their patch at the trained size; far from it they fit worse."""
        if k_near == self.config.k_near:
            return self
        net = NormalNet(replace(self.config, k_near=k_near))
        net.load_state_dict(self.state_dict())
        net.use_bf16, net.fit_dtype = self.use_bf16, self.fit_dtype
        return net.to(self.scale_flags.device).train(self.training)

    def logits(self, patches: torch.Tensor) -> torch.Tensor:
        """Per-frame logits ``(B, F, K)`` (``F = 1`` without FA)."""
        return self.network(patches)[0]

    def network(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-frame logits ``(B, F, K)`` and per-frame patch outputs ``(B, F, G)`` or None
        (``K = k_near + k_far``: the outer ring's and the wide summary's rows are not used
        here)."""
        c = self.config
        self._check(patches)
        patches = patches[:, : c.k_near + c.k_far]
        b, k, _ = patches.shape
        if c.fa:
            frames = compute_frames(patches, group=c.group,
                                    center=torch.zeros(b, 3, dtype=patches.dtype,
                                                       device=patches.device))
            return self._fused_logits(patches, frames.rotations)
        else:
            local = patches.unsqueeze(1)  # (B, 1, K, 3)
        f = local.shape[1]
        flags = self.scale_flags.to(local.dtype).expand(b, f, k).unsqueeze(-1)
        feats = [local, flags]
        if c.near_features:  # the same coordinates at the near scale's own radius
            near_r = patches[:, : c.k_near].pow(2).sum(-1).mean(-1).sqrt().clamp_min(NEAR_R_MIN)
            feats.insert(1, local / near_r[:, None, None, None])
        x = torch.cat(feats, -1).reshape(b * f, k, -1)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, cache_enabled=False,
                            enabled=self.use_bf16):
            out, glob = self.backbone.from_first(self.backbone.l1(x))
        return self._shape_out(out, glob, patches.dtype, b, f, k)

    def _check(self, patches: torch.Tensor) -> None:
        size = self.config.patch.size
        if patches.ndim != 3 or patches.shape[1:] != (size, 3):
            raise ValueError(f"patches must have shape (B, {size}, 3), got {tuple(patches.shape)}")

    @staticmethod
    def _shape_out(out: torch.Tensor, glob: torch.Tensor | None, dtype: torch.dtype, b: int, f: int,
                   k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if glob is not None:
            glob = glob.to(dtype).reshape(b, f, -1)
        return out.to(dtype).reshape(b, f, k), glob

    def _fused_logits(self, patches: torch.Tensor,
                      rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """FA folded into the first layer: ``l1([x R, flag]) = x (R W^T) + flag w + b`` (and
        the near-scale copy ``x R / r`` folds in the same way), one
        batched product per frame element instead of materialising ``x R`` and the input
        concatenation. ``patches (B, K, 3)``, ``rot (B, F, 3, 3)`` -> logits ``(B, F, K)``."""
        b, k, _ = patches.shape
        f = rot.shape[1]
        l1 = self.backbone.l1
        w_xyz, w_flag = l1.weight[:, :3], l1.weight[:, -1]  # (w0, 3), (w0,)
        w_eff = w_xyz.t().to(rot.dtype).expand(b, 3, -1)  # (B, 3, w0)
        if self.config.near_features:  # x R W1^T + (x R / r_near) W2^T = x R (W1 + W2 / r)^T
            near_r = patches[:, : self.config.k_near].pow(2).sum(-1).mean(-1).sqrt()
            w2 = l1.weight[:, 3:6].t().to(rot.dtype)
            w_eff = w_eff + w2 / near_r.clamp_min(NEAR_R_MIN)[:, None, None]
        # the first layer in float32 (it sees the coordinates; bf16 would round them to 3
        # digits), the rest under bf16 autocast when asked for
        eff = rot @ w_eff.unsqueeze(1)  # (B, F, 3, w0)
        # the flag and bias terms ride in the same product: [x, flag, 1] @ [eff; w_flag; b]
        extra = torch.stack([w_flag, l1.bias]).to(eff.dtype).expand(b, f, 2, -1)
        eff = torch.cat([eff, extra], 2)  # (B, F, 5, w0)
        ones = torch.ones(k, dtype=patches.dtype, device=patches.device)
        aug = torch.cat([patches, torch.stack([self.scale_flags.to(patches.dtype), ones],
                                              -1).expand(b, k, 2)], -1)  # (B, K, 5)
        pre = (aug.unsqueeze(1) @ eff).reshape(b * f, k, -1)  # (B*F, K, w0)
        with torch.autocast(device_type=patches.device.type, dtype=torch.bfloat16, cache_enabled=False,
                            enabled=self.use_bf16):
            out, glob = self.backbone.from_first(pre)
        return self._shape_out(out, glob, patches.dtype, b, f, k)

    def forward(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.fit(patches, *self.network(patches))

    def fit(self, patches: torch.Tensor, logits: torch.Tensor,
            glob: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The weighted fits from the network's outputs: ``patches (B, K, 3)``, ``logits
        (B, F, K)``, ``glob (B, F, G)`` or None -> the outputs of :meth:`forward`."""
        c = self.config
        self._check(patches)
        out_dtype = patches.dtype
        if self.fit_dtype is not None:  # the fits (not the network) in e.g. float64
            patches, logits = patches.to(self.fit_dtype), logits.to(self.fit_dtype)
            glob = glob.to(self.fit_dtype) if glob is not None else None
        weights = torch.sigmoid(logits.mean(1)) + 1e-4  # (B, K) invariant
        g = glob.mean(1) if glob is not None else None  # (B, G) invariant per-patch outputs
        base = weights
        if c.k_ext:  # the outer ring: sigmoid(a + b r) of the distance r to the query
            i = self.global_index["ring"]
            r = patches[:, c.k_near + c.k_far:c.k_near + c.k_far + c.k_ext].norm(dim=-1)  # (B, k_ext)
            a, b = self.ring_bias + g[:, i:i + 1], self.ring_slope + g[:, i + 1:i + 2]
            base = torch.cat([weights, torch.sigmoid(a + b * r) + 1e-4], 1)  # (B, K + k_ext)
        n_pts = base.shape[1]  # rows that are points (network's, then the ring's)
        if c.wide_stride:  # the wide summary: one weight per patch for its six rows
            i = self.global_index["wide"]
            log_w = (self.wide_log_weight + g[:, i:i + 1]).clamp(-20, 10)  # (B, 1)
            wide_w = log_w.exp().expand(-1, patches.shape[1] - n_pts)  # (B, 6)
            base = torch.cat([base, wide_w], 1)
        fit_w = base
        if c.refine:  # per patch: e.g. wide (off) under heavy noise; (B, 1) invariant
            i = self.global_index["scale"]
            # bounded: a degenerate patch (copies of one point) must not overflow exp()
            log_scale = (self.refine_log_scale + g[:, i:i + 1]).clamp(-10, 10)
        aug = homogeneous(patches)  # (B, K, 4)
        for _ in range(c.refine):  # robust passes: down-weight points far from the plane
            # (plane, not quadratic, residuals: a quadratic bends across a crease and leaves
            # both sides with small residuals)
            # (the wide summary's rows are not points: they keep their weight and stay out
            # of the residual scale)
            _, vecs, mean = moment_fit(aug, fit_w)
            r2 = plane_residuals(aug[:, :n_pts], vecs[..., 0], mean).square()  # (B, K)
            w_pts = fit_w[:, :n_pts]
            s2 = (w_pts * r2).sum(-1, keepdim=True) / w_pts.sum(-1, keepdim=True)  # weighted MSE
            w_new = base[:, :n_pts] * torch.exp(-0.5 * r2 / ((2 * log_scale).exp() * s2 + 1e-8))
            # a pass that weighs every point 0 (underflow, e.g. a patch of copies of one
            # point) keeps the previous weights
            w_pts = torch.where(w_new.sum(-1, keepdim=True) > 0, w_new, w_pts)
            fit_w = torch.cat([w_pts, base[:, n_pts:]], 1)
        vals, vecs, _ = moment_fit(aug, fit_w)
        normal = vecs[..., 0]  # (B, 3): the plane fit's normal
        if c.fit == "jet2":
            jet = jet_normal(patches[:, :n_pts], fit_w[:, :n_pts], vecs)  # (B, 3)
            if c.gate:  # learned blend of the plane and quadratic normals, signs aligned
                i = self.global_index["gate"]
                gate = torch.sigmoid(g[:, i:i + 1])  # (B, 1) invariant
                sign = torch.where((jet * normal).sum(-1, keepdim=True) < 0, -1.0, 1.0)
                normal = gate * jet * sign + (1 - gate) * normal
                normal = normal / normal.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            else:
                normal = jet
        vals = vals.clamp_min(0)
        total = vals.sum(-1).clamp_min(1e-12)
        curvature = vals[:, 0] / total
        planarity = (vals[:, 1] - vals[:, 0]) / vals[:, 1].clamp_min(1e-12)
        if logits.shape[1] > 1:  # agreement of the frame elements' weights, in [0, 1]
            per_frame = torch.sigmoid(logits.detach())  # (B, F, K)
            spread = (per_frame - per_frame.mean(1, keepdim=True)).abs().mean((1, 2))
            agreement = (1 - 2 * spread).clamp(0, 1)
        else:
            agreement = torch.ones_like(planarity)
        return {"normal": normal.to(out_dtype),
                "confidence": patch_confidence(agreement, planarity).to(out_dtype),
                "curvature": curvature.to(out_dtype), "weights": weights.to(out_dtype)}
