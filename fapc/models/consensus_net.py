"""A learned smoothing step for noisy clouds: each query's normal becomes a weighted mean of
itself and its patch's normals, with the weights given by a small network of invariant
features.

It replaces the fixed smoothing of :mod:`fapc.consensus` where a cloud is noisy (``eps >=
gamma x spacing``). The fixed step weighs all 64 patch normals alike; at a crease under noise
that blends the two faces. Here each candidate's weight reads how well it agrees with the
query (the angle between their normals, each one's distance to the other's plane, in units of
the point spacing), how far it lies, its own fit (its spread) and the cloud's noise level.

Features are distances and unsigned cosines, so the weights are invariant and the output
normal moves with the cloud: rotations, reflections, translations and permutations.

The top eigenvector ``v`` of the weighted sum of ``n n^T`` is found by power iteration
started at the query's own normal (differentiable, and sign-free: ``n n^T`` does not see the
sign). ``output="eig"`` (the first shipped weights) returns it; ``output="mean"`` turns each
normal to agree with ``v`` and returns their weighted vector mean. The two differ where the
weights are spread over directions: the mean weighs each normal by its weight, the top
eigenvector by about its weight times its cosine to ``v``, so it leans further toward the
heaviest direction (two directions 60 degrees apart, weighted 3 : 1: 9.6 degrees from the
heavier, against the mean's 13.9). Trained with the squared angle as the loss (the benchmark's
RMSE), the mean scored better on TRAIN data.

Two options widen what a weight can read. ``face``: each candidate's *face offset*, the
query's distance to the plane of that candidate's face, where the face is every patch point
whose normal agrees with the candidate's (a Gaussian of ``sin^2`` of their angle, width
``face_sin2``) and the plane has the candidate's normal through their mean; and that face's
share of the patch. Averaged over a face's points the offset is far less noisy than a
distance to one noisy point's plane: near a crease under light noise it tells which face the
query lies on. ``context``: the per-candidate hidden features are pooled over the patch (mean
and max), and each weight reads its own features beside the pool (a set network), so a weight
can depend on what the other candidates are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from fapc.gather import rows

PAIR_FEATURES = 6  # per candidate: see pair_features
QUERY_FEATURES = 2  # per query: noise level and own spread, over the spacing
FACE_FEATURES = 2  # with ``face``, per candidate and for the query's own normal: see face_features
OUTPUTS = ("eig", "mean")


@dataclass(frozen=True)
class ConsensusNetConfig:
    hidden: int = 24
    layers: int = 2  # hidden layers of the per-candidate weight network
    iterations: int = 16  # power iterations
    output: str = "eig"  # "eig": the top eigenvector; "mean": the sign-aligned weighted mean
    face: bool = False  # face offsets and shares among the features (face_features)
    face_sin2: float = 0.02  # width of a face: a Gaussian of sin^2 of the angle between normals
    context: bool = False  # each weight also reads the mean and max of the patch's features
    kind: str = "consensus"

    def __post_init__(self) -> None:
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {self.output!r}")
        if not self.face_sin2 > 0:
            raise ValueError(f"face_sin2 must be > 0, got {self.face_sin2}")

    @property
    def pair_features(self) -> int:
        return PAIR_FEATURES + (FACE_FEATURES if self.face else 0)

    @property
    def query_features(self) -> int:
        return QUERY_FEATURES + (FACE_FEATURES if self.face else 0)

    @property
    def face_width(self) -> float | None:
        """``face_sin2`` where the net reads face features, else None: what
        :func:`net_inputs` takes as its ``face_sin2``."""
        return self.face_sin2 if self.face else None

    @classmethod
    def from_json(cls, text: str) -> ConsensusNetConfig:
        import json

        d = json.loads(text)
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def to_json(self) -> str:
        import json

        return json.dumps(asdict(self))


def _log(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x.clamp_min(0) + 1e-3)


def query_features(eps: torch.Tensor, spread_own: torch.Tensor,
                   spacing: torch.Tensor) -> torch.Tensor:
    """``(Q, QUERY_FEATURES)`` from the noise level ``eps (Q,)``, the query's own spread
    ``(Q,)`` and the point spacing ``(Q,)``."""
    return torch.stack([_log(eps / spacing), _log(spread_own / spacing)], -1)


def pair_features(rel: torch.Tensor, own: torch.Tensor, nj: torch.Tensor, spread_j: torch.Tensor,
                  spacing: torch.Tensor, far: torch.Tensor) -> torch.Tensor:
    """``(Q, C, PAIR_FEATURES)`` for candidates at ``rel (Q, C, 3)`` (relative to the query)
    with normals ``nj (Q, C, 3)`` and spreads ``(Q, C)``; ``own (Q, 3)`` the query's normal,
    ``spacing (Q,)``, ``far (C,)`` 1 for far-scale slots."""
    s = spacing[:, None]
    cos = (nj * own[:, None]).sum(-1).abs()  # (Q, C)
    off_own = (rel * own[:, None]).sum(-1).abs() / s  # candidate from the query's plane
    off_cand = (rel * nj).sum(-1).abs() / s  # query from the candidate's plane
    dist = rel.norm(dim=-1) / s
    return torch.stack([cos, _log(off_own), _log(off_cand), _log(dist), _log(spread_j / s),
                        far.to(rel.dtype).expand_as(cos)], -1)


def face_features(rel: torch.Tensor, nj: torch.Tensor, own: torch.Tensor, spacing: torch.Tensor,
                  *, sin2: float, chunk: int = 256
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Face offsets and shares: ``(Q, C, FACE_FEATURES)`` for the candidates at ``rel (Q, C,
    3)`` (relative to the query) with normals ``nj (Q, C, 3)``, and ``(Q, FACE_FEATURES)``
    for the query's own normal ``own (Q, 3)``; ``spacing (Q,)``.

    The face of a normal ``n_j`` is every point of the patch (the query at 0 included) that
    weighs ``a_ij = exp(-sin^2(n_i, n_j) / sin2)``; its offset is ``|sum_i a_ij n_j . rel_i| /
    sum_i a_ij`` (the query's distance to the plane with normal ``n_j`` through the face's
    weighted mean) over the spacing, given as a log, and its share ``mean_i a_ij``. Sign-free,
    so invariant to the normals' signs, rotations, reflections, translations and the order of
    the candidates. ``O(C^2)`` per query, in chunks of ``chunk`` queries (small: the
    ``(chunk, 1 + C, 1 + C)`` weights then stay in the cache)."""
    if rel.ndim != 3 or rel.shape[2] != 3 or nj.shape != rel.shape or own.shape != (len(rel), 3):
        raise ValueError(f"rel and nj (Q, C, 3), own (Q, 3) expected, got {tuple(rel.shape)}, "
                         f"{tuple(nj.shape)}, {tuple(own.shape)}")
    pair = [rel.new_zeros(0, rel.shape[1], FACE_FEATURES)]  # Q may be 0
    mine = [rel.new_zeros(0, FACE_FEATURES)]
    for s in range(0, len(rel), chunk):
        r = torch.cat([torch.zeros_like(rel[s:s + chunk, :1]), rel[s:s + chunk]], 1)  # (q, 1+C, 3)
        n = torch.cat([own[s:s + chunk, None], nj[s:s + chunk]], 1)  # (q, 1+C, 3), own first
        a = (n @ n.transpose(1, 2)).square_().clamp_(max=1).sub_(1).div_(sin2).exp_()  # [j, i]
        off = (n * (a @ r)).sum(-1) / a.sum(-1)  # (q, 1+C): n_j . sum_i a_ji r_i; a_jj = 1
        f = torch.stack([_log(off.abs() / spacing[s:s + chunk, None]), a.mean(-1)], -1)
        mine.append(f[:, 0])
        pair.append(f[:, 1:])
    return torch.cat(pair), torch.cat(mine)


def net_inputs(points: torch.Tensor, normals: torch.Tensor, spreads: torch.Tensor, *,
               own: torch.Tensor, eps: torch.Tensor, spacing: torch.Tensor, query: torch.Tensor,
               candidates: torch.Tensor, n_near: int, dtype: torch.dtype | None = None,
               face_sin2: float | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inputs of :meth:`ConsensusNet.forward` (in ``dtype``, default the points') for the
    queries ``query (Q,)``
    with normals ``own (Q, 3)``, noise level and spacing ``(Q,)`` each, and ``candidates (Q,
    C)`` (the near scale's ``n_near`` first, then the far scale's) in a cloud of ``points (N,
    3)`` with ``normals`` and ``spreads`` (:func:`fapc.consensus.spread`) at every point;
    ``face_sin2``: also the face features (:func:`face_features`) at that width, for a net
    whose config sets ``face``."""
    dtype = dtype or points.dtype
    # differences in the points' precision (georeferenced clouds), then the features in dtype
    rel = (rows(points, candidates) - points[query].unsqueeze(1)).to(dtype)  # (Q, C, 3)
    nj = rows(normals, candidates).to(dtype)  # (Q, C, 3)
    own, spacing = own.to(dtype), spacing.to(dtype)
    far = (torch.arange(candidates.shape[1], device=candidates.device) >= n_near)  # (C,)
    pair = pair_features(rel, own, nj, rows(spreads, candidates).to(dtype), spacing, far)
    qf = query_features(eps.to(dtype), spreads[query].to(dtype), spacing)
    if face_sin2 is not None:
        fp, fq = face_features(rel, nj, own, spacing, sin2=face_sin2)
        pair, qf = torch.cat([pair, fp], -1), torch.cat([qf, fq], -1)
    return own, nj, pair, qf


class ConsensusNet(nn.Module):
    """Weights for the candidates' and the query's own ``n n^T``; see the module docstring."""

    def __init__(self, config: ConsensusNetConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or ConsensusNetConfig()
        p, q, h = c.pair_features, c.query_features, c.hidden
        layers: list[nn.Module] = [nn.Linear(p + q, h), nn.ReLU()]
        for _ in range(c.layers - 1):
            layers += [nn.Linear(h, h), nn.ReLU()]
        pool = 2 * h if c.context else 0  # the patch's mean and max hidden features
        if c.context:  # the per-candidate features, then a head on [own features, pool]
            self.pair = nn.Sequential(*layers)
            self.mix = nn.Sequential(nn.Linear(h + pool, h), nn.ReLU(), nn.Linear(h, 1))
        else:
            self.pair = nn.Sequential(*layers, nn.Linear(h, 1))
        self.own = nn.Sequential(nn.Linear(q + pool, h), nn.ReLU(), nn.Linear(h, 1))

    def forward(self, own: torch.Tensor, nj: torch.Tensor, pair: torch.Tensor,
                query: torch.Tensor) -> torch.Tensor:
        """``own (Q, 3)``, ``nj (Q, C, 3)``, ``pair (Q, C, P)``, ``query (Q, F)`` -> unit
        normals ``(Q, 3)``; ``P`` and ``F`` the config's ``pair_features`` and
        ``query_features``."""
        p = self.config.pair_features
        if own.ndim != 2 or own.shape[1] != 3 or nj.shape[:1] != own.shape[:1] \
                or pair.shape[:2] != nj.shape[:2] or pair.shape[2] != p \
                or query.shape != (len(own), self.config.query_features):
            raise ValueError(f"own (Q, 3), nj (Q, C, 3), pair (Q, C, {p}), query (Q, "
                             f"{self.config.query_features}) expected, got {tuple(own.shape)}, "
                             f"{tuple(nj.shape)}, {tuple(pair.shape)}, {tuple(query.shape)}")
        # the first layer on [pair, query] split in two: the query's part once per query
        first = self.pair[0]
        h = pair @ first.weight[:, :p].T  # (Q, C, hidden)
        h = h + (query @ first.weight[:, p:].T + first.bias).unsqueeze(1)
        if self.config.context:
            h = self.pair[1:](h)  # (Q, C, hidden)
            pool = torch.cat([h.mean(1), h.amax(1)], -1)  # (Q, 2 hidden)
            mix, hidden = self.mix[0], h.shape[2]  # split likewise: the pool's part per query
            m = h @ mix.weight[:, :hidden].T + (pool @ mix.weight[:, hidden:].T
                                                 + mix.bias).unsqueeze(1)  # (Q, C, hidden)
            logits = torch.cat([self.own(torch.cat([query, pool], -1)),
                                self.mix[1:](m).squeeze(-1)], 1)  # (Q, 1 + C)
        else:
            logits = torch.cat([self.own(query), self.pair[1:](h).squeeze(-1)], 1)  # (Q, 1 + C)
        w = torch.softmax(logits, 1)
        vecs = torch.cat([own[:, None], nj], 1)  # (Q, 1 + C, 3)
        m = (vecs * w[..., None]).transpose(1, 2) @ vecs  # (Q, 3, 3)
        v = own
        for _ in range(self.config.iterations):
            v = (m @ v[..., None]).squeeze(-1)
            v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        if self.config.output == "mean":  # each normal turned to agree with v, then averaged
            sign = torch.where((vecs @ v.detach()[..., None]).squeeze(-1) < 0, -1.0, 1.0)
            v = ((w * sign.to(w.dtype))[..., None] * vecs).sum(1)  # (Q, 3)
            v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return v
