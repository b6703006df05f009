"""``fapc sample``, ``fapc train`` and ``fapc eval``: thin typer commands over
:mod:`fapc.datasets`, :mod:`fapc.train` and :mod:`fapc.evaluate`."""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from fapc.cli import _error, _fail, _setup_logging, app, err, out
from fapc.errors import FapcError


@app.command()
def sample(
    meshes: Annotated[list[str], typer.Argument(help="Mesh files or directories.")],
    output: Annotated[str, typer.Option("-o", "--output", help="Output directory.")] = "samples",
    n: Annotated[int, typer.Option("-n", help="Points per cloud.")] = 100_000,
    noise: Annotated[float, typer.Option(help="Gaussian noise, fraction of the bbox diagonal.")] = 0.0,
    density: Annotated[str, typer.Option(help="uniform, gradient or stripe.")] = "uniform",
    outliers: Annotated[float, typer.Option(help="Fraction of uniform outliers.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    fmt: Annotated[str, typer.Option("--format", help="ply, pcd, npz or xyzn.")] = "ply",
) -> None:
    """Sample meshes into clouds with ground-truth normals (for training or evaluation).

    Example: fapc sample parts/ -n 100000 --noise 0.006 --density gradient -o clouds/
    """
    import numpy as np

    from fapc.cloud import PointCloud
    from fapc.datasets import DENSITIES, discover, load_shape, make_cloud
    from fapc.io import write_cloud

    _setup_logging()
    if density not in DENSITIES:
        _fail(f"--density takes {', '.join(DENSITIES)}", 2)
    if n < 1:
        _fail(f"-n must be at least 1, got {n}", 2)
    if noise < 0:
        _fail(f"--noise must be >= 0, got {noise:g}", 2)
    if not 0 <= outliers < 1:
        _fail(f"--outliers must be in [0, 1), got {outliers:g}", 2)
    if fmt not in ("ply", "pcd", "npz", "xyzn"):
        _fail(f"--format takes ply, pcd, npz or xyzn, got {fmt!r}", 2)
    failed = 0
    files = []
    for m in meshes:  # a missing input is reported, the others still sampled
        try:
            files += discover(m)
        except FapcError as e:
            failed += 1
            _error(str(e))
    for f in files:
        try:
            shape = load_shape(f)
            if not shape.is_mesh:
                raise FapcError("not a mesh", path=f)
            pts, nrm = make_cloud(shape, n=n, noise=noise, density=density, outliers=outliers,
                                  seed=seed)
            dest = os.path.join(output, f"{shape.name}.{fmt}")
            write_cloud(dest, PointCloud(points=pts, normals=nrm.astype(np.float32)))
            err.print(f"[green]wrote[/] {escape(dest)} ({len(pts):,} points)", highlight=False)
        except FapcError as e:
            failed += 1
            _error(str(e))
    if failed:
        raise typer.Exit(1)


@app.command()
def train(
    data: Annotated[list[str] | None, typer.Argument(
        help="Meshes, clouds with normals, PCPNet lists or directories.")] = None,
    out_dir: Annotated[str, typer.Option("--out", help="Run directory.")] = "runs/normals",
    config: Annotated[str | None, typer.Option(help="TOML file of settings (flags win).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (default 10).")] = None,
    steps_per_epoch: Annotated[int | None, typer.Option(help="Steps per epoch (default 200).")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Patches per step (default 256).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default 3e-3).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda (default auto).")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (default 0).")] = None,
    val_fraction: Annotated[float | None, typer.Option(
        help="Share of shapes held out for validation (default 0.2).")] = None,
    val_shapes: Annotated[str | None, typer.Option(
        help="Comma-separated shape names (file names without extension) to hold out for "
        "validation instead of --val-fraction.")] = None,
    noise: Annotated[str | None, typer.Option(
        help="Noise levels (fractions of the diagonal) (default 0,0.00125,0.006,0.012).")] = None,
    noise_spread: Annotated[float | None, typer.Option(
        help="Share of training clouds whose noise lies between the levels: log-uniform "
        "from --noise-low to the largest level (default 0).")] = None,
    noise_low: Annotated[float | None, typer.Option(
        help="Smallest noise drawn between the levels (default 0.0002).")] = None,
    points: Annotated[int | None, typer.Option(help="Points per training cloud (default 100000).")] = None,
    points_low: Annotated[int | None, typer.Option(
        help="Vary the training clouds' size: log-uniform from this to --points (default 0: "
        "off).")] = None,
    procedural: Annotated[bool | None, typer.Option(
        "--procedural/--no-procedural", help="Add procedural primitives (default on).")] = None,
    fa: Annotated[bool | None, typer.Option(
        "--fa/--no-fa", help="Frame averaging (off: the same backbone, not equivariant).")] = None,
    group: Annotated[str | None, typer.Option(help="SO3 (4 frames) or O3 (8) (default SO3).")] = None,
    amp: Annotated[bool | None, typer.Option("--amp/--no-amp", help="bf16 on CUDA (default on).")] = None,
    mode: Annotated[str | None, typer.Option(
        help="patch (local patches, the default model) or shape (one FA-PointNet/FA-DGCNN "
        "over whole clouds, the frame-averaging paper's setting).")] = None,
    backbone: Annotated[str | None, typer.Option(
        help="Shape mode: pointnet or dgcnn (default pointnet).")] = None,
    shape_points: Annotated[int | None, typer.Option(
        help="Shape mode: points per cloud (default 512).")] = None,
    outliers: Annotated[float | None, typer.Option(
        help="Fraction of uniform outliers added to training clouds (default 0).")] = None,
    time_limit: Annotated[float | None, typer.Option(
        help="Seconds: end the run by then, the learning rate annealed over that time; the "
        "last step is validated and saved (default 0: off).")] = None,
    bank: Annotated[int | None, typer.Option(
        help="Patches built per training cloud when it is sampled, then drawn from: one "
        "large query instead of many small ones (e.g. 4096; default 0: built per batch).")] = None,
    workers: Annotated[int | None, typer.Option(
        help="Processes that build training batches (default 0: the training process; "
        "on a GPU host use most CPU cores).")] = None,
    loss: Annotated[str | None, typer.Option(
        help="rmse (the default: the benchmark's mean of per-cloud RMSEs, each training "
        "shape at each noise level a group), sin (mean |sin| of the angle), sin2 or sq (mean "
        "squared angle).")] = None,
    init: Annotated[str | None, typer.Option(
        help="Start from this model's weights, e.g. fapc/weights/default.safetensors to "
        "fine-tune the shipped model on your data.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Final metrics as JSON on stdout.")] =
    False,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Train the normal network; the run directory gets best/last.safetensors, state.pt,
    config.json and log.csv.

    Example: fapc train meshes/ --out runs/mine --epochs 20 --device cuda
    """
    from fapc.train import TrainConfig, check_settings
    from fapc.train import train as run_train

    _setup_logging()
    given = {"out": out_dir, "epochs": epochs, "steps_per_epoch": steps_per_epoch,
             "max_steps": max_steps, "batch_size": batch_size, "lr": lr, "device": device,
             "seed": seed, "val_fraction": val_fraction, "points": points,
             "procedural": procedural, "fa": fa, "group": group, "amp": amp, "mode": mode,
             "backbone": backbone, "shape_points": shape_points, "outliers": outliers,
             "init": init, "workers": workers, "bank": bank, "loss": loss,
             "time_limit": time_limit, "noise_spread": noise_spread, "noise_low": noise_low,
             "points_low": points_low}
    if data:
        given["data"] = list(data)
    if val_shapes:
        given["val_shapes"] = tuple(n.strip() for n in val_shapes.split(",") if n.strip())
    if noise is not None:
        try:
            given["noise"] = tuple(float(x) for x in noise.split(","))
        except ValueError:
            _fail(f"--noise takes comma-separated numbers, got {noise!r}", 2)
    try:
        if config:
            cfg = TrainConfig.from_toml(config, **given)
        elif resume and os.path.exists(os.path.join(out_dir, "config.json")):
            with open(os.path.join(out_dir, "config.json")) as f:
                d = json.load(f)
            d.update({k: v for k, v in given.items() if v is not None})
            for key in ("noise", "widths", "procedural_names", "val_shapes"):
                if key in d:
                    d[key] = tuple(d[key])
            cfg = TrainConfig(**d)
        else:
            d = {k: v for k, v in given.items() if v is not None}
            if init:  # the architecture of the (patch) model we start from, unless given
                from fapc.models.checkpoint import load_model
                from fapc.models.normal_net import NormalNetConfig

                start, _ = load_model(init)
                if isinstance(start.config, NormalNetConfig):
                    # not clean_k_near: a near scale measured for those weights, not for the
                    # ones this run makes of them
                    arch = {k: getattr(start.config, k) for k in NormalNetConfig.__dataclass_fields__
                            if k in TrainConfig.__dataclass_fields__ and k != "clean_k_near"}
                    d = {**arch, **d}
            cfg = TrainConfig(**d)
        try:
            check_settings(cfg)
        except FapcError as e:
            _fail(str(e), 2)
        with Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/"
                      "{task.total}"), TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                      console=err, transient=False) as prog:
            task = prog.add_task("train", total=cfg.total_steps, info="")

            def on_step(step: int, total: int, m: dict) -> None:
                info = f"loss {m['loss']:.4f}"
                if "val_rmse" in m:
                    info += f"  val {m['val_rmse']:.2f} deg"
                prog.update(task, completed=step, info=info)

            metrics = run_train(cfg, on_step=on_step, resume=resume)
    except FapcError as e:
        if debug:
            raise
        _fail(str(e))
    if as_json:
        out.print_json(json.dumps({**metrics, "model": os.path.join(cfg.out, "best.safetensors")}))
        return
    err.print(f"best validation RMSE {metrics['best_val_rmse']:.3f} deg; model: "
              + escape(os.path.join(cfg.out, "best.safetensors")), highlight=False)


@app.command(name="eval")
def eval_cmd(
    data: Annotated[list[str], typer.Argument(help="Meshes, clouds with normals, PCPNet lists.")],
    model: Annotated[str | None, typer.Option(
        help="Model .safetensors or run directory (default the shipped model).")] = None,
    consensus_model: Annotated[str | None, typer.Option(
        help="The learned smoothing's weights (file or train_consensus --out directory; "
        "default the shipped ones).")] = None,
    crease: Annotated[bool, typer.Option(
        help="With the optional face choice at creases (as fapc normals --crease).")] = False,
    light_smoothing: Annotated[bool | None, typer.Option(
        "--light-smoothing/--no-light-smoothing",
        help="With (or without) the light smoothing, as fapc normals --light-smoothing "
        "(default: the model's choice per cloud).")] = None,
    draws: Annotated[int | None, typer.Option(
        help="Draws of the far points averaged, as fapc normals --draws (default: the "
        "model's choice per cloud).")] = None,
    rotate: Annotated[str, typer.Option(help="none, so3 or o3: random pose per cloud.")] = "none",
    columns: Annotated[str, typer.Option(help="Mesh columns.")] = "none,0.125%,0.6%,1.2%",
    pca_k: Annotated[str, typer.Option(help="PCA baselines' k.")] = "16,32,64,128,256",
    points: Annotated[int, typer.Option(help="Points per mesh cloud.")] = 100_000,
    queries: Annotated[int, typer.Option(help="Query points per cloud (no .pidx).")] = 5000,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for sampling, noise, queries, poses.")] = 0,
    plots: Annotated[str | None, typer.Option(
        help="Directory for an error histogram per column and an error-coloured render per "
        "cloud.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Full report as JSON on stdout.")] = False,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Unoriented RMSE (deg), PGP5 and PGP10 per column for a model and PCA baselines.

    Example: fapc eval test_meshes/ --model runs/mine --rotate so3
    """
    from fapc.datasets import load_shapes
    from fapc.evaluate import DENSITY_COLUMNS, NOISE_COLUMNS, build_clouds, evaluate, model_method, pca_method
    from fapc.models.checkpoint import load_model
    from fapc.runtime import load_network, resolve_device

    _setup_logging()
    try:
        cols = tuple(c.strip() for c in columns.split(",") if c.strip())
        bad = [c for c in cols if c not in NOISE_COLUMNS and c not in DENSITY_COLUMNS]
        if bad or not cols:
            _fail(f"--columns takes {', '.join([*NOISE_COLUMNS, *DENSITY_COLUMNS])}, got "
                  f"{columns!r}", 2)
        try:
            ks = [int(k) for k in pca_k.split(",") if k.strip()]
        except ValueError:
            ks = [0]
        if not ks or min(ks) < 3:
            _fail(f"--pca-k takes comma-separated whole numbers of at least 3, got {pca_k!r}", 2)
        if draws is not None and draws < 1:
            _fail(f"--draws must be at least 1, got {draws}", 2)
        dev = resolve_device(device)
        net, info = load_model(model, device=dev)
        load_network(net, dev, consensus_model=consensus_model)  # refuse a bad one now
        shapes = load_shapes(data)
        if not shapes:
            raise FapcError("no usable shapes (meshes or clouds with normals)")
        clouds = build_clouds(shapes, columns=cols, points=points, queries=queries, seed=seed)
        label = "fa" if net.config.fa else "no-fa"
        if getattr(net.config, "kind", "patch") == "shape":
            label += f"-{net.config.backbone}"
        methods = {label: model_method(net, device=str(dev), consensus_model=consensus_model,
                                       crease=crease, light_smoothing=light_smoothing,
                                       draws=draws)}
        methods.update({f"pca-{k}": pca_method(k) for k in ks})
        with Progress(TextColumn("[bold]eval"), BarColumn(), TextColumn("{task.completed}/"
                      "{task.total} clouds"), TimeRemainingColumn(), console=err) as prog:
            task = prog.add_task("eval", total=len(clouds))
            hists: dict[str, dict[str, list]] = {}
            model_name = next(iter(methods))

            def on_errors(c, name, pts, e) -> None:
                if plots is None:
                    return
                hists.setdefault(c.column, {}).setdefault(name, []).append(e)
                if name == model_name:
                    from fapc.render import render as draw

                    os.makedirs(plots, exist_ok=True)
                    draw(pts, os.path.join(plots, f"{c.name}_{c.column}_error.png".replace(
                        "%", "pct")), field=e, cmap="inferno", vmin=0, vmax=30,
                        title=f"{c.name} {c.column}: {name} error (deg, 0-30)")

            report = evaluate(clouds, methods, rotate=rotate, seed=seed,
                              on_cloud=lambda c: prog.advance(task), on_errors=on_errors)
        if plots is not None:
            import numpy as np

            from fapc.render import error_histogram

            for col, per in hists.items():
                keep = {m: np.concatenate(v) for m, v in per.items()
                        if m == model_name or m == f"pca-{report['best_k'][col]}"}
                error_histogram(keep, os.path.join(plots, f"hist_{col}.png".replace("%", "pct")),
                                title=f"column {col}")
    except (FapcError, ValueError) as e:
        if debug:
            raise
        _fail(str(e))
    report["model"] = info["path"]
    report["rotate"] = rotate
    if as_json:
        out.print_json(json.dumps(report))
        return
    print_report(report, title=escape(f"RMSE (deg), rotate={rotate}, model={info['path']}"))


def print_report(report: dict, *, title: str) -> None:
    t = Table(title=title)
    t.add_column("method")
    for c in report["columns"]:
        t.add_column(c, justify="right")
    t.add_column("avg", justify="right")
    t.add_column("PGP5/PGP10", justify="right")
    for m, row in report["table"].items():
        p5 = sum(report["pgp5"][m].values()) / len(row)
        p10 = sum(report["pgp10"][m].values()) / len(row)
        t.add_row(m, *(f"{row[c]:.2f}" for c in report["columns"]), f"{report['avg'][m]:.2f}",
                  f"{p5:.2f}/{p10:.2f}")
    out.print(t)
