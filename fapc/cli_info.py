"""``fapc info``: what a file holds (points, bounding box, attributes, normals, LAS and E57
metadata) and, with ``--noise``, how noisy the cloud is and the near scale the shipped model
runs at on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
import typer
from rich.markup import escape
from rich.table import Table

from fapc.cli import _error, app, out
from fapc.errors import FapcError

if TYPE_CHECKING:
    from fapc.cloud import PointCloud
    from fapc.near_scale import Choices
    from fapc.noise import NoiseFigure


@app.command()
def info(
    files: Annotated[list[Path], typer.Argument(help="Point-cloud or mesh files.")],
    from_mesh: Annotated[str | None, typer.Option(help="vertices or sample:N")] = None,
    noise: Annotated[bool, typer.Option(
        "--noise", help="Also measure the noise, in point spacings (none, light or heavy: "
        "which fapc normals options are made for the cloud), and give the near scale the "
        "default model runs at on it.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout, one object per "
                                          "line and file.")] = False,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Points, bounding box, attributes and normals of each FILE (exit 1 if any failed)."""
    from fapc.io import read_cloud

    failed = False
    for file in files:
        try:
            cloud = read_cloud(file, from_mesh=from_mesh)
            pts, duplicates = _distinct_finite(cloud)  # as fapc normals sees the cloud
            figure, near = None, None
            if noise:  # (imports torch: only when asked)
                from fapc.models.checkpoint import cached_model
                from fapc.near_scale import choices_for_figure, figure_points
                from fapc.noise import noise_figure

                figure = noise_figure(pts)
                # the near scale fapc normals runs the shipped model at on this cloud (its
                # figure is this one unless the cloud is larger than the block it looks at)
                block = figure_points(pts)
                config = cached_model(None, "cpu")[0].config
                chosen = figure if len(block) == len(pts) else noise_figure(block)
                near = choices_for_figure(config, chosen)
        except FapcError as e:
            if debug:
                raise
            _error(str(FapcError(e.reason, path=file)))
            failed = True
            continue
        _info_one(file, cloud, as_json=as_json, duplicates=duplicates, noise=figure,
                  near_scale=near)
    if failed:
        raise typer.Exit(1)


# what each noise level is made for (fapc.noise)
NOISE_HINTS = {"none": "noiseless", "light": "--light-smoothing, --crease are made for it",
               "heavy": "sigma is a lower bound here",
               "unknown": "nearly every neighbourhood is a line, as along scan lines"}


def _info_one(file: Path, cloud: PointCloud, *, as_json: bool, duplicates: int,
              noise: NoiseFigure | None = None,
              near_scale: Choices | None = None) -> None:
    from fapc.io import sniff_format

    pts = cloud.points
    finite = np.isfinite(pts).all(axis=1)
    lo = pts[finite].min(0).tolist() if finite.any() else [float("nan")] * 3
    hi = pts[finite].max(0).tolist() if finite.any() else [float("nan")] * 3
    data = {
        "file": str(file), "format": sniff_format(str(file)).lstrip("."),
        "points": len(cloud), "non_finite": int((~finite).sum()),
        "duplicates": duplicates,
        "dtype": str(pts.dtype), "bbox_min": lo, "bbox_max": hi,
        "normals": cloud.normals is not None, "faces": 0 if cloud.faces is None else len(cloud.faces),
        "attributes": {k: f"{v.dtype}{'' if v.ndim == 1 else f'x{v.shape[1]}'}"
                       for k, v in cloud.attributes.items()},
    }
    if "las" in cloud.metadata:
        from fapc.io.las import describe

        data["las"] = describe(cloud.metadata["las"])
    if "e57" in cloud.metadata:  # each scan: its name, points and scanner position
        e57, index = cloud.metadata["e57"], cloud.attributes["scan_index"]
        counts = np.bincount(index, minlength=len(e57["names"]))
        data["e57_scans"] = [{"name": n, "points": int(c), "origin": o.tolist()}
                             for n, c, o in zip(e57["names"], counts, e57["origins"], strict=True)]
    if noise is not None:
        data["noise"] = noise.to_dict()
    if near_scale is not None:
        (data["fa_near_scale"], data["fa_edge_near_scale"], data["fa_light_smoothing"],
         data["fa_draws"], smoother, data["fa_plane_vote"], data["fa_exact_planes"]) = near_scale
        data["fa_smoothing_weights"] = "heavy-noise" if smoother else "default"
    if as_json:
        typer.echo(json.dumps(data))
        return
    t = Table(title=escape(str(file)), show_header=False)
    t.add_column("", style="bold")
    t.add_column("")

    def row(key: str, value: str) -> None:  # values from the file: no rich markup
        t.add_row(key, escape(value))

    for key in ("format", "points", "non_finite", "duplicates", "dtype", "normals", "faces"):
        row(key, f"{data[key]:,}" if isinstance(data[key], int) and not
            isinstance(data[key], bool) else str(data[key]))
    row("bbox min", " ".join(f"{v:.10g}" for v in lo))  # UTM metres to the mm
    row("bbox max", " ".join(f"{v:.10g}" for v in hi))
    if "las" in data:
        las = data["las"]
        row("las", f"point format {las['point_format']}, scale "
            f"{' '.join(f'{v:g}' for v in las['scale'])}, coordinate system "
            f"{las['crs'] or 'none recorded'}")
    for i, scan in enumerate(data.get("e57_scans", [])):
        row(f"scan {i}", f"{scan['name']}: {scan['points']:,} points, scanner at "
            + " ".join(f"{v:.10g}" for v in scan["origin"]))
    row("attributes", ", ".join(f"{k} ({v})" for k, v in data["attributes"].items()) or "-")
    if noise is not None:
        if noise.level == "unknown":
            row("noise", f"unknown ({noise.lines:.0%} of neighbourhoods lines; "
                f"{NOISE_HINTS[noise.level]})")
        else:
            lines = (f", {noise.lines:.0%} of neighbourhoods lines, left out"
                     if noise.lines >= 0.01 else "")
            row("noise", f"{noise.level}: {noise.ratio:.3f} point spacings (sigma "
                f"{noise.sigma:.4g}, spacing {noise.spacing:.4g}{lines}; "
                f"{NOISE_HINTS[noise.level]})")
            row("whiteness", f"{noise.whiteness:.2f} (about 1.2 where the scatter is noise, "
                "0.7 or less where it is relief finer than a 32-point neighbourhood)")
    if near_scale is not None:
        k, edge, light, draws, smoother, vote, exact = near_scale
        at_edges = f", and {edge} at sharp edges (curved fits)" if edge else ""
        row("fa near scale", f"{k} nearest points{at_edges} (what fapc normals runs the "
            "shipped model at here: smaller on noiseless clouds without scan lines, and at "
            "edges under light noise; --k overrides it)")
        row("light smoothing", ("on" if light else "off") + " by default here (on where "
            "the model sets it, for light noise whose scatter is noise, not relief; "
            "--light-smoothing / --no-light-smoothing override it)")
        row("draws", f"{draws} by default here (draws of the network's far points averaged: "
            "more than 1 where the model sets it, on heavily noisy and on noiseless clouds; "
            "--draws overrides it)")
        row("smoothing weights", ("heavy-noise (consensus_heavy.safetensors)" if smoother else
                                  "default (consensus.safetensors)") + " by default here (the "
            "learned smoothing's heavy-noise weights where the package holds them and the "
            "cloud reads heavily noisy; --consensus-model overrides it)")
        row("plane vote", ("on" if vote else "off") + " by default here (on where the model "
            "sets it, on noiseless clouds without scan lines; --plane-vote / --no-plane-vote "
            "override it)")
        row("exact planes", ("on" if exact else "off") + " by default here (on where the "
            "model sets it, on noiseless clouds without scan lines: each point whose mesh "
            "facet holds it exactly takes that plane's normal; --exact-planes / "
            "--no-exact-planes override it)")
    out.print(t)


def _distinct_finite(cloud: PointCloud) -> tuple[np.ndarray, int]:
    """The cloud's distinct finite points ``(U, 3)`` float64, and how many finite points
    repeat an earlier one exactly (fapc normals estimates each distinct point once)."""
    from fapc.neighbors import distinct_points

    pts = np.asarray(cloud.points, np.float64)
    pts = pts[np.isfinite(pts).all(axis=1)]
    dup = distinct_points(pts)
    return (pts, 0) if dup is None else (pts[dup[0]], len(pts) - len(dup[0]))
