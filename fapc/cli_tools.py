"""``fapc bench`` and ``fapc render``: thin typer commands over :mod:`fapc.profile` and
:mod:`fapc.render`."""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from fapc.cli import _error, _fail, _setup_logging, app, err, out
from fapc.errors import FapcError


@app.command()
def bench(
    points: Annotated[str, typer.Option(help="Synthetic cloud sizes, e.g. 100k,1M,10M.")] = "1M",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    method: Annotated[str, typer.Option(help="fa or pca.")] = "fa",
    model: Annotated[str | None, typer.Option(help="Model file (default the shipped model).")] = None,
    real: Annotated[list[str] | None, typer.Option(help="Real clouds to time as well.")] = None,
    orient: Annotated[str, typer.Option(help="Orientation stage: none, mst, ...")] = "none",
    precision: Annotated[str, typer.Option(help="Network arithmetic: auto (= float32) or bf16.")] =
    "auto",
    crease: Annotated[bool, typer.Option(
        help="fa: with the optional face choice at creases (in the consensus stage).")] = False,
    light_smoothing: Annotated[bool | None, typer.Option(
        "--light-smoothing/--no-light-smoothing",
        help="fa: with (or without) the light smoothing, in the consensus stage (default: "
        "the model's choice per cloud, as fapc normals).")] = None,
    open3d: Annotated[bool, typer.Option("--open3d/--no-open3d",
                                         help="Time open3d estimate_normals too.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Results as JSON on stdout.")] = False,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Time each stage of the pipeline (read, kNN, frames, network, orientation, write).

    Example: fapc bench --points 100k,1M --device cuda --json
    """
    import tempfile

    from fapc.profile import open3d_reference, parse_sizes, profile_file, synthetic_file

    _setup_logging()
    results = []
    try:
        sizes = parse_sizes(points)
    except ValueError as e:
        _fail(f"--points: {e}", 2)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            files = [synthetic_file(n, tmp) for n in sizes] + list(real or [])
            for f in files:
                r = profile_file(f, method=method, device=device, model=model, orient=orient,
                                 precision=precision, crease=crease,
                                 light_smoothing=light_smoothing)
                if open3d:
                    r["open3d"] = open3d_reference(f)
                    if r["open3d"]:
                        r["ratio_vs_open3d"] = r["total_s"] / r["open3d"]["total_s"]
                results.append(r)
    except (FapcError, ValueError) as e:
        if debug:
            raise
        _fail(str(e))
    if as_json:
        out.print_json(json.dumps(results))
        return
    stages = ["read", "knn", "frames", "network", "consensus", "estimate", "orient", "write"]
    t = Table(title=f"fapc bench ({method}, seconds per stage)")
    for col in ["cloud", "points", *stages, "total", "Mpts/s", "open3d", "ratio", "peak MB"]:
        t.add_column(col, justify="right")
    for r in results:
        st = r["stages_s"]
        o3 = r.get("open3d")
        t.add_row(escape(os.path.basename(r["file"])), f"{r['points']:,}",
                  *(f"{st[s]:.2f}" if s in st else "-" for s in stages), f"{r['total_s']:.2f}",
                  f"{r['points_per_s'] / 1e6:.3f}", f"{o3['total_s']:.2f}" if o3 else "-",
                  f"{r['ratio_vs_open3d']:.2f}x" if o3 else "-",
                  f"{r.get('peak_gpu_mb', r['peak_rss_mb']):.0f}")
    out.print(t)


@app.command()
def render(
    clouds: Annotated[list[str], typer.Argument(help="Clouds to draw.")],
    output: Annotated[str, typer.Option("-o", "--output", help="PNG file (one cloud) or "
                                        "directory (several).")] = "view.png",
    color: Annotated[str, typer.Option(help="normal, height, or a field name (confidence, "
                                       "curvature, intensity...).")] = "normal",
    views: Annotated[str, typer.Option(help="Comma-separated: front, side, top, iso.")] =
    "front,side,iso",
    cmap: Annotated[str, typer.Option(help="Matplotlib colour map for fields.")] = "viridis",
    max_points: Annotated[int, typer.Option(help="Draw at most this many points.")] = 300_000,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Draw clouds offscreen (no display or GPU needed), shaded by normal or coloured by a field.

    Example: fapc render scan.normals.ply --color confidence -o conf.png
    """
    from fapc.io import read_cloud
    from fapc.render import VIEWS
    from fapc.render import render as draw

    _setup_logging()
    names = tuple(v.strip() for v in views.split(",") if v.strip())
    bad = [v for v in names if v not in VIEWS]
    if bad or not names:
        _fail(f"--views takes {', '.join(VIEWS)}", 2)
    failed = 0
    for path in clouds:
        dest = output if len(clouds) == 1 else os.path.join(
            output, os.path.splitext(os.path.basename(path))[0] + ".png")
        try:
            c = read_cloud(path)
            kw: dict = {}
            if color == "normal":
                if c.normals is None:
                    raise FapcError("has no normals to colour by (run fapc normals first, or "
                                    "--color height)", path=path)
                kw["normals"] = c.normals
            elif color != "height":
                if color not in c.attributes:
                    raise FapcError(f"has no field {color!r} (fields: "
                                    f"{', '.join(c.attributes) or 'none'})", path=path)
                kw["field"] = c.attributes[color].reshape(len(c), -1)[:, 0]
            os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
            draw(c.points, dest, views=names, cmap=cmap, max_points=max_points,
                 title=os.path.basename(path), **kw)
            err.print(f"[green]wrote[/] {escape(dest)}", highlight=False)
        except FapcError as e:
            if debug:
                raise
            failed += 1
            _error(str(e))
    if failed:
        raise typer.Exit(1)
