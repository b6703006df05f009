"""``fapc train``: fit the normal network on meshes or clouds with ground truth.

A run directory holds ``config.json``, ``log.csv``, ``best.safetensors`` (lowest validation
RMSE), ``last.safetensors`` and ``state.pt`` (optimizer, step and RNG states for
``--resume``; loaded with ``weights_only=True``). Under ``torchrun`` the run is data-parallel
(DistributedDataParallel; gloo on CPU, NCCL on CUDA); rank 0 writes the files.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

from fapc.datasets import load_shapes, procedural_shapes
from fapc.errors import FapcError
from fapc.losses import make_loss, unoriented_loss
from fapc.models.checkpoint import save_model
from fapc.models.normal_net import NormalNet, NormalNetConfig
from fapc.runtime import resolve_device
from fapc.train_data import batch_stream, split_shapes, validation_set

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Settings of a training run (``fapc train --help`` documents each)."""

    data: list[str] = field(default_factory=list)
    out: str = "runs/normals"
    epochs: int = 10
    steps_per_epoch: int = 200
    max_steps: int | None = None
    time_limit: float = 0.0  # seconds: stop (and anneal the learning rate) by then (0: off)
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-4
    device: str = "auto"
    seed: int = 0
    val_fraction: float = 0.2
    val_shapes: tuple[str, ...] = ()  # names to hold out instead of val_fraction
    val_queries: int = 500
    noise: tuple[float, ...] = (0.0, 0.00125, 0.006, 0.012)
    # a fraction of training clouds with noise between the levels: log-uniform from
    # noise_low to the largest level (grouped with the nearest level, in log scale)
    noise_spread: float = 0.0
    noise_low: float = 0.0002
    density_prob: float = 0.3
    outliers: float = 0.0
    points: int = 100_000
    points_low: int = 0  # > 0: each training cloud's size log-uniform in [points_low, points]
    procedural: bool = True
    procedural_names: tuple[str, ...] = ()
    pool: int = 6
    refresh_every: int = 25
    bank: int = 0  # patches built per cloud when it is made, then drawn from (0: per batch)
    amp: bool = True
    fa: bool = True
    group: str = "SO3"
    k_near: int = 32
    k_far: int = 32
    far_stride: int = 6
    widths: tuple[int, ...] = (16, 32)
    head: int = 16
    fit: str = "jet2"
    near_features: bool = False
    clean_k_near: int = 0  # near scale at inference on noiseless clouds (0: k_near)
    far_smooth: int = 0
    k_ext: int = 0
    wide_stride: int = 0
    k_wide: int = 32
    refine: int = 0
    gate: bool = False
    loss: str = "rmse"  # fapc.losses.LOSSES
    ema: float = 0.0  # decay of an exponential moving average of the weights (0: off)
    init: str | None = None  # start from this model's weights (patch sizes may differ)
    mode: str = "patch"  # or "shape": one FA-PointNet/DGCNN over whole clouds
    backbone: str = "pointnet"  # shape mode: pointnet or dgcnn
    shape_points: int = 512
    workers: int = 0  # DataLoader processes building batches (0: in the training process)

    def model_config(self) -> NormalNetConfig:
        """The model settings: every :class:`NormalNetConfig` field of the same name (kept
        flat here so TOML files and flags stay one level)."""
        names = [f.name for f in fields(NormalNetConfig) if hasattr(self, f.name)]
        return NormalNetConfig(**{n: tuple(v) if isinstance(v := getattr(self, n), list) else v
                                  for n in names})

    def build_model(self) -> torch.nn.Module:
        if self.mode == "shape":
            from fapc.models.shape_net import ShapeNetConfig, ShapeNormalNet

            return ShapeNormalNet(ShapeNetConfig(backbone=self.backbone, points=self.shape_points,
                                                 fa=self.fa, group="E3" if self.group == "SO3"
                                                 else self.group))
        if self.mode != "patch":
            raise FapcError(f"mode must be patch or shape, got {self.mode!r}")
        return NormalNet(self.model_config())

    @property
    def total_steps(self) -> int:
        total = self.epochs * self.steps_per_epoch
        return min(total, self.max_steps) if self.max_steps else total

    @classmethod
    def from_toml(cls, path: str, **overrides: Any) -> TrainConfig:
        import tomllib

        with open(path, "rb") as f:
            d = tomllib.load(f)
        known = {f.name for f in fields(cls)}
        bad = set(d) - known
        if bad:
            raise FapcError(f"unknown settings {sorted(bad)}", path=path)
        d.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("noise", "widths", "procedural_names", "val_shapes"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


def check_settings(cfg: TrainConfig) -> None:
    """Refuse settings a run cannot use, with the setting's name (before any data is read)."""
    from fapc.losses import LOSSES

    for name in ("epochs", "steps_per_epoch", "batch_size", "points", "val_queries"):
        if getattr(cfg, name) < 1:
            raise FapcError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("bank", "workers", "time_limit"):
        if getattr(cfg, name) < 0:
            raise FapcError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise FapcError(f"max_steps must be at least 1, got {cfg.max_steps}")
    if not cfg.lr > 0:
        raise FapcError(f"lr must be > 0, got {cfg.lr}")
    if not 0 <= cfg.val_fraction < 1:
        raise FapcError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if not 0 <= cfg.outliers < 1:
        raise FapcError(f"outliers must be in [0, 1), got {cfg.outliers}")
    if cfg.loss not in LOSSES:
        raise FapcError(f"loss must be one of {', '.join(LOSSES)}, got {cfg.loss!r}")
    if cfg.mode == "patch" and cfg.group not in ("SO3", "O3"):
        raise FapcError(f"group must be SO3 or O3, got {cfg.group!r}")
    _check_sampling(cfg)


def _check_sampling(cfg: TrainConfig) -> None:
    """Refuse noise and size settings that cannot be drawn from, with the setting's name."""
    if not cfg.noise or min(cfg.noise) < 0:
        raise FapcError(f"noise levels must be >= 0, got {list(cfg.noise)}")
    if not 0 <= cfg.noise_spread <= 1:
        raise FapcError(f"noise_spread must be in [0, 1], got {cfg.noise_spread}")
    if cfg.noise_spread and not 0 < cfg.noise_low < max(cfg.noise):
        raise FapcError(f"noise_low must be in (0, {max(cfg.noise):g}) (the largest noise "
                        f"level), got {cfg.noise_low:g}")
    if cfg.points_low and not 0 < cfg.points_low <= cfg.points:
        raise FapcError(f"points_low must be in (0, points={cfg.points}], got {cfg.points_low}")


def evaluate_patches(model: NormalNet, val, device: torch.device) -> dict[str, float]:
    """``val_rmse``: RMSE (deg) per noise level, averaged over the levels (the benchmark's
    way: a pooled RMSE would be ruled by the noisiest clouds)."""
    model.eval()
    losses, n_all = 0.0, 0
    by_level: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for name, p, n in val:
            for s in range(0, len(p), 2048):
                out = model(p[s:s + 2048].to(device))["normal"].float().cpu().reshape(-1, 3)
                t = n[s:s + 2048].reshape(-1, 3)
                losses += float(unoriented_loss(out, t)) * len(t)
                n_all += len(t)
                cos = (out * t).sum(-1).abs().clamp(max=1)
                by_level.setdefault(name.rsplit("@", 1)[-1], []).append(
                    torch.rad2deg(torch.arccos(cos)))
    model.train()
    rmse = {level: float(torch.cat(e).pow(2).mean().sqrt()) for level, e in by_level.items()}
    out = {"val_loss": losses / max(n_all, 1), "val_rmse": sum(rmse.values()) / len(rmse)}
    out.update({f"val_rmse@{level}": v for level, v in rmse.items()})
    return out


def warm_start(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` into ``model``, which may have grown since: parameters it lacks keep
    their initial values, and an output layer with more rows (new per-patch outputs) takes
    the old rows. Any other mismatch raises ``RuntimeError``."""
    own = model.state_dict()
    merged = dict(own)
    for key, value in state.items():
        if key not in own:
            raise RuntimeError(f"unexpected parameter {key!r}")
        mine = own[key]
        if mine.shape == value.shape:
            merged[key] = value
        elif (mine.ndim == value.ndim and mine.shape[1:] == value.shape[1:]
              and mine.shape[0] > value.shape[0]):
            merged[key] = torch.cat([value, mine[value.shape[0]:]])
        else:
            raise RuntimeError(f"size mismatch for {key}: {tuple(value.shape)} in the model, "
                               f"{tuple(mine.shape)} here")
    model.load_state_dict(merged)


def _digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _all_ranks_agree(flag: bool, world: int, device: torch.device) -> bool:
    """``flag`` on rank 0, for every rank (clocks differ between processes); ``device`` is
    the rank's own (NCCL broadcasts CUDA tensors only)."""
    if world == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([float(flag)], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def train(cfg: TrainConfig, *, on_step: Callable[[int, int, dict[str, float]], None] | None = None,
          resume: bool = False) -> dict[str, Any]:
    """Run training; returns the final metrics. See the module docstring for the run files."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
        dist.init_process_group(backend=backend)
    try:
        device = resolve_device(cfg.device)
    except ValueError as e:
        raise FapcError(str(e)) from None
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    check_settings(cfg)
    try:
        os.makedirs(cfg.out, exist_ok=True)
    except OSError as e:
        raise FapcError(f"cannot create the run directory ({e.strerror})", path=cfg.out) from None
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    shapes = load_shapes(cfg.data) if cfg.data else []
    train_shapes, val_shapes = split_shapes(shapes, cfg.val_fraction, cfg.seed,
                                            names=cfg.val_shapes)
    if cfg.procedural:
        train_shapes = train_shapes + procedural_shapes(cfg.procedural_names or None)
    if not train_shapes:
        raise FapcError("no training shapes (give DATA, or keep --procedural)")
    if not val_shapes:
        log.warning("no shape left for validation: validating on procedural shapes")
        val_shapes = procedural_shapes()[:2]
    try:  # "rmse": one group per training shape and noise level (fapc.train_data.group_id)
        loss_fn = make_loss(cfg.loss, groups=len(train_shapes) * len(cfg.noise))
    except ValueError as e:
        raise FapcError(str(e)) from None
    mcfg = cfg.model_config()
    model = cfg.build_model().to(device)
    if cfg.init and not resume:  # warm start: the weights of another model of the same widths
        from fapc.models.checkpoint import load_model

        start, _ = load_model(cfg.init)
        try:
            warm_start(model, start.state_dict())
        except RuntimeError as e:
            raise FapcError(f"cannot start from this model: {str(e).splitlines()[0]}",
                            path=cfg.init) from None
    model.use_bf16 = cfg.amp and device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.total_steps
    t0 = time.perf_counter()

    def progress(s: int) -> float:
        """Share of the schedule done: of the steps or, with ``time_limit``, of the time,
        whichever is further (so a time-limited run still anneals its learning rate)."""
        done = min(s, total) / total
        if cfg.time_limit:
            done = max(done, min(1.0, (time.perf_counter() - t0) / cfg.time_limit))
        return done

    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * progress(s))))
    step, best = 0, float("inf")
    os.makedirs(cfg.out, exist_ok=True)
    state_path = os.path.join(cfg.out, "state.pt")
    if resume:
        if not os.path.exists(state_path):
            raise FapcError("nothing to resume (no state.pt)", path=cfg.out)
        from fapc.models.checkpoint import load_model

        loaded, _ = load_model(os.path.join(cfg.out, "last.safetensors"))
        model.load_state_dict(loaded.state_dict())
        state = torch.load(state_path, weights_only=True, map_location="cpu")
        if "raw" in state:  # with an EMA, last.safetensors holds the average, not the weights
            model.load_state_dict(state["raw"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, best = int(state["step"]), float(state["best"])
        torch.set_rng_state(state["torch_rng"])
    # the weights that are validated and saved: an EMA copy when cfg.ema > 0
    kept = copy.deepcopy(model) if cfg.ema > 0 else model
    if resume and cfg.ema > 0 and "ema" in state:
        kept.load_state_dict(state["ema"])
    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
    if rank == 0:
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=2)
    val = validation_set(val_shapes, cfg, mcfg.patch) if rank == 0 else []
    batches = batch_stream(train_shapes, cfg, mcfg.patch, seed=cfg.seed * 1000 + rank, step=step,
                           rank=rank, pin=device.type == "cuda")
    log_path = os.path.join(cfg.out, "log.csv")
    new_log = not (resume and os.path.exists(log_path))
    metrics: dict[str, float] = {}
    model.train()
    running = []
    with open(log_path, "w" if new_log else "a", newline="") as logf:
        writer = csv.writer(logf)
        if new_log:
            writer.writerow(["step", "epoch", "lr", "train_loss", "val_loss", "val_rmse", "seconds"]
                            + [f"val_rmse@{level:g}" for level in cfg.noise])
        out_of_time = False
        while step < total and not out_of_time:
            patches, target, group = next(batches)
            patches = patches.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
            pred = ddp(patches)["normal"].float().reshape(-1, 3)
            loss = loss_fn(pred, target.reshape(-1, 3), group.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if kept is not model:
                with torch.no_grad():
                    decay = min(cfg.ema, (1 + step) / (10 + step))  # short warm-up
                    for e, p in zip(kept.parameters(), model.parameters(), strict=True):
                        e.lerp_(p, 1 - decay)
            step += 1
            last_loss = float(loss.detach())
            running.append(last_loss)
            if cfg.time_limit:
                out_of_time = _all_ranks_agree(time.perf_counter() - t0 >= cfg.time_limit, world,
                                               device)
            end_epoch = step % cfg.steps_per_epoch == 0 or step == total or out_of_time
            if rank == 0 and end_epoch:
                metrics = evaluate_patches(kept, val, device)
                metrics.update(train_loss=float(np.mean(running)), step=step,
                               epoch=math.ceil(step / cfg.steps_per_epoch))
                running = []
                writer.writerow([step, metrics["epoch"], f"{sched.get_last_lr()[0]:.6g}",
                                 f"{metrics['train_loss']:.6f}", f"{metrics['val_loss']:.6f}",
                                 f"{metrics['val_rmse']:.4f}", f"{time.perf_counter() - t0:.1f}"]
                                + [f"{metrics.get(f'val_rmse@{level:g}', float('nan')):.4f}"
                                   for level in cfg.noise])
                logf.flush()
                save_model(os.path.join(cfg.out, "last.safetensors"), kept, metrics=metrics)
                if metrics["val_rmse"] < best:
                    best = metrics["val_rmse"]
                    save_model(os.path.join(cfg.out, "best.safetensors"), kept, metrics=metrics)
                tmp = state_path + ".tmp"
                extra = {"ema": kept.state_dict(), "raw": model.state_dict()} if kept is not model else {}
                torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                            "step": step, "best": best, "torch_rng": torch.get_rng_state(),
                            **extra}, tmp)
                os.replace(tmp, state_path)
            if on_step and rank == 0:
                on_step(step, total, {**metrics, "loss": last_loss})
    batches.close()  # stops DataLoader workers, if any
    if world > 1:
        digests = [None] * world
        dist.all_gather_object(digests, _digest(model))
        if rank == 0:
            with open(os.path.join(cfg.out, "ddp_ranks.json"), "w") as f:
                json.dump({"world_size": world, "digests": digests}, f)
        dist.barrier()
        dist.destroy_process_group()
    metrics["best_val_rmse"] = best
    return metrics
