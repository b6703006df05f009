"""Training the learned consensus step (:mod:`fapc.models.consensus_net`) on TRAIN shapes.

``python -m fapc.train_consensus --config fapc/weights/default.toml --out runs/consensus``

- **Data.** The shapes of the network's own training split (``--config``: its data and its
  seeded validation split; procedural shapes left out), each at 0.125 %, 0.6 % and 1.2 %
  noise (uniform density) and at 0.4 % noise with a density gradient: 100,000 points per
  cloud, the shipped network's normals (no consensus, one draw), features at 12,000 random
  points per cloud (``--queries``) where the noise gate opens (``eps >= gamma x spacing``).
  ``--model`` trains the step for another network's normals. ``--face`` and ``--context``
  train the design with face offsets and pooled patch features
  (:mod:`fapc.models.consensus_net`; the shipped heavy-noise weights,
  ``consensus_heavy.safetensors``, are this design, the default ones are not).
- **Validation.** The network's held-out shapes at the four PCPNet noise levels (0, 0.125 %,
  0.6 %, 1.2 %), 5,000 queries each: the learned step against the fixed smoothing, per level.
- **Training.** The mean squared unoriented angle (``--loss sq``, the benchmark's RMSE
  squared; any of :data:`fapc.losses.LOSSES`, e.g. ``sin``: mean ``|sin|``, the first
  shipped weights' loss, or ``rmse`` with each cloud a group) of the
  sign-aligned weighted mean (``--output mean``; ``eig``: the top eigenvector, the first
  shipped weights' rule), Adam with a one-cycle schedule, the last epoch kept. Writes
  ``consensus.safetensors`` (config, fapc version and the validation figures as metadata)
  and ``log.txt`` into ``--out``.

No TEST shape is read.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any

import numpy as np
import torch

from fapc.consensus import ConsensusSettings, consensus_normals, learned_gate, noise_level, spread
from fapc.losses import LOSSES
from fapc.models.consensus_net import OUTPUTS, ConsensusNet, ConsensusNetConfig, net_inputs

log = logging.getLogger(__name__)

TRAIN_LEVELS = ((0.00125, "uniform"), (0.006, "uniform"), (0.012, "uniform"), (0.004, "gradient"))
VAL_LEVELS = ((0.0, "uniform"), (0.00125, "uniform"), (0.006, "uniform"), (0.012, "uniform"))


def cloud_inputs(points: np.ndarray, normals: np.ndarray, gt: np.ndarray, query: np.ndarray,
                 *, spec: Any, seed: int = 0, face_sin2: float | None = None) -> dict[str, Any]:
    """Everything the learned step sees at ``query (Q,)`` of one cloud (``points``, network
    ``normals`` and true normals ``gt``, each ``(N, 3)``), built as the pipeline builds it;
    also the fixed step's result (``fixed (Q, 3)``) and the gate (``gate (Q,)`` bool).
    ``face_sin2``: with the face features, for a config that sets ``face``."""
    from fapc.patches import PatchBuilder

    pts = points - points.mean(0)
    builder = PatchBuilder(pts, spec, seed=seed)
    p = torch.from_numpy(pts)
    n = torch.from_numpy(normals).double()
    near = torch.from_numpy(builder.near_all)
    spreads = spread(p, n, torch.arange(len(p)), near[:, :ConsensusSettings.spread_k])
    q = torch.from_numpy(query)
    cand = torch.from_numpy(builder.neighbours(query))  # (Q, k_near + k_far)
    support = cand[:, :spec.k_near]
    fixed, _, _ = consensus_normals(p, n, spreads, query=q, candidates=cand, support=support)
    own, _, _ = consensus_normals(p, n, spreads, query=q, candidates=cand, support=support,
                                  settings=ConsensusSettings(smooth_from=1e9, smooth_full=2e9))
    eps, spacing = noise_level(p, spreads, query=q, candidates=cand, support=support)
    gate = learned_gate(eps, spacing)
    inputs = net_inputs(p, n, spreads, own=own[gate], eps=eps[gate], spacing=spacing[gate],
                        query=q[gate], candidates=cand[gate], n_near=spec.k_near,
                        face_sin2=face_sin2)
    return {"inputs": tuple(x.float() for x in inputs), "gate": gate, "fixed": fixed.float(),
            "own": own.float(), "gt": torch.from_numpy(gt[query]).float()}


def make_clouds(shapes: list, levels: tuple, *, model: Any, queries: int | None,
                seed: int, face_sin2: float | None = None) -> list[dict[str, Any]]:
    """Clouds of ``shapes`` at ``levels`` ((noise, density) pairs) with the network's normals
    (one draw: the draws each run the consensus step on their own normals); ``queries``:
    random points per cloud (None: 5,000, the PCPNet protocol's count); ``face_sin2`` as in
    :func:`cloud_inputs`."""
    from fapc.datasets import make_cloud
    from fapc.normals import estimate_normals

    out = []
    for i, shape in enumerate(shapes):
        for j, (noise, density) in enumerate(levels):
            s = seed + 100 * i + j
            pts, gt = make_cloud(shape, n=100_000, noise=noise, density=density, seed=s)
            rng = np.random.default_rng(s)
            q = np.sort(rng.choice(len(pts), min(queries or 5000, len(pts)), replace=False))
            nrm = estimate_normals(pts, method="fa", model=model, consensus=False,
                                   draws=1).normals
            c = cloud_inputs(pts, nrm, gt, q, spec=model.config.patch, face_sin2=face_sin2)
            c["name"], c["level"] = shape.name, f"{noise * 100:g}% {density}"
            out.append(c)
            log.info("%s at %s: %d of %d queries gated", shape.name, c["level"],
                     int(c["gate"].sum()), len(q))
    return out


def _angle_rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    cos = (a * b).sum(-1).abs() / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)
    return float(torch.rad2deg(torch.arccos(cos.clamp(max=1.0))).square().mean().sqrt())


def evaluate(net: ConsensusNet, clouds: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Per level: mean over clouds of the RMSE (degrees) of the fixed and the learned step."""
    per: dict[str, list[tuple[float, float]]] = {}
    with torch.no_grad():
        for c in clouds:
            out = c["fixed"].clone()
            if c["gate"].any():
                out[c["gate"]] = net(*c["inputs"])
            per.setdefault(c["level"], []).append((_angle_rmse(c["fixed"], c["gt"]),
                                                   _angle_rmse(out, c["gt"])))
    return {k: (float(np.mean([a for a, _ in v])), float(np.mean([b for _, b in v])))
            for k, v in per.items()}


def train_net(clouds: list[dict[str, Any]], *, config: ConsensusNetConfig, epochs: int,
              lr: float, batch: int, seed: int, loss: str = "sq",
              on_epoch: Any = None) -> ConsensusNet:
    """Fit a :class:`ConsensusNet` to the gated queries of ``clouds``; ``loss``: one of
    :data:`fapc.losses.LOSSES` (for ``rmse`` each cloud is a group)."""
    from fapc.losses import make_loss

    loss_fn = make_loss(loss, groups=max(1, len(clouds)))
    torch.manual_seed(seed)
    data = [torch.cat([c["inputs"][i] for c in clouds]) for i in range(4)]
    gt = torch.cat([c["gt"][c["gate"]] for c in clouds])
    group = torch.cat([torch.full((int(c["gate"].sum()),), j) for j, c in enumerate(clouds)])
    n = len(gt)
    net = ConsensusNet(config)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr,
                                                total_steps=epochs * ((n + batch - 1) // batch))
    for epoch in range(epochs):
        perm = torch.randperm(n)
        total = 0.0
        for s in range(0, n, batch):
            i = perm[s:s + batch]
            value = loss_fn(net(*(d[i] for d in data)), gt[i], group[i])  # pred (B, 3)
            opt.zero_grad()
            value.backward()
            opt.step()
            sched.step()
            total += float(value.detach()) * len(i)
        if on_epoch is not None:
            on_epoch(epoch, total / n, net)
    return net.eval()


def main(argv: list[str] | None = None) -> int:
    from fapc.datasets import load_shapes
    from fapc.models.checkpoint import load_model, save_model
    from fapc.train import TrainConfig
    from fapc.train_data import split_shapes

    p = argparse.ArgumentParser(prog="python -m fapc.train_consensus")
    p.add_argument("--config", default="fapc/weights/default.toml",
                   help="the network's training config (its data and validation split)")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None,
                   help="the network whose normals the step refines (default: the shipped one)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--hidden", type=int, default=24)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss", choices=LOSSES, default="sq")
    p.add_argument("--output", choices=OUTPUTS, default="mean")
    p.add_argument("--face", action="store_true", help="face offsets among the features")
    p.add_argument("--context", action="store_true",
                   help="each weight also reads the patch's pooled features")
    p.add_argument("--queries", type=int, default=12_000, help="queries per training cloud")
    args = p.parse_args(argv)
    if args.queries < 1:
        p.error("--queries must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.makedirs(args.out, exist_ok=True)
    cfg = TrainConfig.from_toml(args.config)
    train_shapes, val_shapes = split_shapes(load_shapes(cfg.data), cfg.val_fraction, cfg.seed,
                                            names=cfg.val_shapes)
    model, _ = load_model(args.model)
    config = ConsensusNetConfig(hidden=args.hidden, layers=args.layers, output=args.output,
                                face=args.face, context=args.context)
    t0 = time.perf_counter()
    train = make_clouds(train_shapes, TRAIN_LEVELS, model=model, queries=args.queries,
                        seed=args.seed, face_sin2=config.face_width)
    val = make_clouds(val_shapes, VAL_LEVELS, model=model, queries=None, seed=args.seed + 7,
                      face_sin2=config.face_width)
    log.info("clouds built in %.0f s", time.perf_counter() - t0)
    lines: list[str] = []

    def on_epoch(epoch: int, loss: float, net: ConsensusNet) -> None:
        res = evaluate(net, val)
        line = f"epoch {epoch} loss {loss:.5f} " + "  ".join(
            f"{k}: {a:.2f} -> {b:.2f}" for k, (a, b) in res.items())
        lines.append(line)
        log.info(line)

    net = train_net(train, config=config, epochs=args.epochs, lr=args.lr, batch=args.batch,
                    seed=args.seed, loss=args.loss, on_epoch=on_epoch)
    res = evaluate(net, val)
    metrics = {"validation_fixed": {k: a for k, (a, _) in res.items()},
               "validation_learned": {k: b for k, (_, b) in res.items()},
               "train_clouds": len(train), "val_shapes": [s.name for s in val_shapes],
               "args": vars(args)}
    save_model(os.path.join(args.out, "consensus.safetensors"), net, metrics=metrics)
    with open(os.path.join(args.out, "log.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
