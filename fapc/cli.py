"""The ``fapc`` command line: a thin layer of typer commands over the library."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fapc import __version__
from fapc.errors import FapcError
from fapc.tiles import MIN_TILE_POINTS, TILE_POINTS

app = typer.Typer(
    name="fapc",
    help="Point-cloud normals with Euclidean-equivariant frame-averaging networks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)
err = Console(stderr=True)
out = Console(width=None if sys.stdout.isatty() else 150)  # piped: tables not cut at 80


_GLOBAL = {"quiet": False, "verbose": False}


def _setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Logs go to stderr; ``--quiet`` keeps errors only, ``--verbose`` adds debug lines
    (per command, or for every command as ``fapc --quiet ...``)."""
    verbose = verbose or _GLOBAL["verbose"]
    quiet = quiet or _GLOBAL["quiet"]
    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logging.basicConfig(level=level, force=True, handlers=[handler])
    logging.addLevelName(logging.WARNING, "warning")
    logging.addLevelName(logging.ERROR, "error")


def _error(message: str) -> None:
    """One error line on stderr; ``message`` (file names, reasons) is printed as it is."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _fail(message: str, code: int = 1) -> None:
    _error(message)
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        out.print(f"fapc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Errors only, for every "
                                        "command.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging on stderr, "
                                          "for every command.")] = False,
) -> None:
    """fapc: point-cloud geometry toolkit."""
    _GLOBAL.update(quiet=quiet, verbose=verbose)


@app.command()
def normals(
    inputs: Annotated[list[str], typer.Argument(help="Files, directories or globs.",
                                                show_default=False)],
    output: Annotated[str | None, typer.Option(
        "-o", "--output", help="Output file, or directory (exists, ends with '/', has no "
        "extension, or several inputs). Default: INPUT.normals.EXT beside each input.")] = None,
    method: Annotated[str, typer.Option(help="Estimator: fa (the network) or pca.")] = "fa",
    k: Annotated[int | None, typer.Option(
        "--k", help="Neighbourhood size: pca's (default 30); fa's near scale, 8-128 (default "
        "the model's: for the shipped one 32, or 16 on noiseless clouds without scan lines, "
        "with a second run at 20 at sharp edges under light noise).",
        show_default=False)] = None,
    model: Annotated[str | None, typer.Option(
        help="FA model: .safetensors file or run directory (default the shipped model).")] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA when available), cpu or cuda.")] = "auto",
    batch_size: Annotated[int | None, typer.Option(
        help="Query points per network batch (default 4096 on a CPU, 262144 on CUDA).")] = None,
    tile_points: Annotated[int, typer.Option(
        help="fa: a cloud of more points than this is done in tiles of at most this many, "
        "each with a halo, with the same normals and the memory of one tile (0: never).")
    ] = TILE_POINTS,
    precision: Annotated[str, typer.Option(
        help="Network arithmetic: auto (= float32) or bf16 (faster on a GPU; a few normals "
        "in 1000 move by 0.1-1 deg).")] = "auto",
    from_mesh: Annotated[str | None, typer.Option(
        help="For meshes: 'vertices' or 'sample:N' (area-uniform samples).")] = None,
    consensus: Annotated[bool, typer.Option(
        help="fa: each normal consults its neighbours' once more: it snaps onto one face at "
        "a sharp edge (clean data) and smooths with them under heavy noise.")] = True,
    consensus_model: Annotated[str | None, typer.Option(
        help="fa: the learned smoothing's weights, a .safetensors file or a directory "
        "holding consensus.safetensors (python -m fapc.train_consensus --out), for every "
        "cloud; default the shipped ones (a heavy-noise set where the cloud reads heavily "
        "noisy).")] = None,
    crease: Annotated[bool, typer.Option(
        help="fa: under light noise (up to about a quarter of the point spacing), points a few "
        "noise widths from a sharp edge take the face they lie on (scans of machined "
        "parts).")] = False,
    light_smoothing: Annotated[bool | None, typer.Option(
        "--light-smoothing/--no-light-smoothing",
        help="fa: under light noise (about 0.01-0.1 of the point spacing), a last pass refits "
        "each normal from its 32 nearest points' normals (lightly noisy scans of smooth "
        "surfaces; rounds detail as fine as the spacing). Default: the model decides per "
        "cloud, by its noise figure (fapc info --noise).")] = None,
    draws: Annotated[int | None, typer.Option(
        help="fa: run the estimate this many times, each with its own draw of the network's "
        "far points, and average: it removes the variance that choice leaves (under heavy "
        "noise, and at the sharp edges of noiseless clouds), at N times the cost. Default: "
        "the model decides per cloud (its heavy_draws where the cloud reads heavily noisy, "
        "its clean_draws where it reads noiseless, else 1; fapc info --noise).")] = None,
    plane_vote: Annotated[bool | None, typer.Option(
        "--plane-vote/--no-plane-vote",
        help="fa: on noiseless data, a last pass lets the patch normals whose planes hold each "
        "point vote on its normal (sharp CAD parts, meshes sampled exactly; not with "
        "--light-smoothing). Default: the model decides per cloud (on where the cloud reads "
        "noiseless and has no scan lines; fapc info --noise).")] = None,
    exact_planes: Annotated[bool | None, typer.Option(
        "--exact-planes/--no-exact-planes",
        help="fa: last of all, each point whose mesh facet holds it exactly (a cloud sampled "
        "without noise from a mesh, float64 or float32 coordinates) takes that plane's normal: "
        "for clouds whose facets are the truth (CAD parts, low-poly models). Default: the "
        "model decides per cloud (the shipped model: off; a model file's clean_exact turns it "
        "on where the cloud reads noiseless without scan lines; fapc info --noise).")] = None,
    fields: Annotated[str, typer.Option(
        help="Comma-separated outputs: normals,confidence,curvature.")] = "normals,confidence,"
    "curvature",
    orient: Annotated[str, typer.Option(
        help="none, mst (consistent over the surface), outward, viewpoint[:x,y,z] (without "
        "coordinates: a PCD's VIEWPOINT, each E57 scan's scanner position), direction[:x,y,z] "
        "(n . d >= 0; +z without coordinates, for airborne LiDAR).")] = "none",
    recursive: Annotated[bool, typer.Option("--recursive", "-r",
                                            help="Descend into sub-directories.")] = False,
    drop_invalid: Annotated[bool, typer.Option(help="Remove NaN/inf points.")] = False,
    strict: Annotated[bool, typer.Option(help="Refuse files with NaN/inf points.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs.")] = False,
    ascii: Annotated[bool, typer.Option("--ascii", help="ASCII PLY/PCD output.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Summary as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More logging.")] = False,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Estimate normals (plus confidence and curvature) for every input cloud.

    Example: fapc normals scans/ -o out/ --method pca --k 30
    """
    from fapc.pipeline import ALL_FIELDS, NormalsOptions, run_normals

    quiet = quiet or _GLOBAL["quiet"]
    _setup_logging(verbose, quiet)
    chosen = tuple(f.strip() for f in fields.split(",") if f.strip())
    bad = [f for f in chosen if f not in ALL_FIELDS]
    if bad or not chosen:
        _fail(f"--fields takes {','.join(ALL_FIELDS)}, got {fields!r}", 2)
    if k is not None and k < 3:
        _fail(f"--k must be at least 3, got {k}", 2)
    from fapc.orient import parse_orient

    try:
        parse_orient(orient)
    except ValueError as e:
        _fail(str(e), 2)
    if method not in ("fa", "pca"):
        _fail(f"--method must be fa or pca, got {method!r}", 2)
    if batch_size is not None and batch_size < 1:
        _fail(f"--batch-size must be at least 1, got {batch_size}", 2)
    if from_mesh is not None:
        from fapc.io.mesh import parse_from_mesh

        try:
            parse_from_mesh(from_mesh)
        except ValueError as e:
            _fail(str(e), 2)
    from fapc.runtime import resolve_device

    try:
        dev = resolve_device(device)
    except ValueError as e:
        _fail(f"--device: {e}", 2)
    except FapcError as e:
        _fail(str(e))
    if draws is not None and draws < 1:
        _fail(f"--draws must be at least 1, got {draws}", 2)
    if tile_points < 0 or (tile_points and tile_points < MIN_TILE_POINTS):
        _fail(f"--tile-points must be 0 (never) or at least {MIN_TILE_POINTS}, got {tile_points}", 2)
    if light_smoothing and plane_vote:
        _fail("--light-smoothing and --plane-vote are both a last consensus pass (one for "
              "lightly noisy clouds, one for noiseless ones): choose one", 2)
    idle = [flag for flag, on in (("--crease", crease), ("--light-smoothing", light_smoothing),
                                  ("--plane-vote", plane_vote))
            if on and (method != "fa" or not consensus)]
    if idle:  # steps of the FA pipeline's consensus stage: say so rather than do nothing quietly
        logging.getLogger("fapc").warning("%s: only with --method fa and the consensus step "
                                          "(on by default); ignored", ", ".join(idle))
    for flag, on in (("--draws", draws is not None), ("--exact-planes", exact_planes)):
        if on and method != "fa":
            logging.getLogger("fapc").warning("%s: only with --method fa; ignored", flag)
    from fapc.runtime import PRECISIONS

    if precision not in PRECISIONS:
        _fail(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}", 2)
    if method == "fa":
        from fapc.near_scale import with_near_scale
        from fapc.runtime import load_network

        try:  # refuse a bad model once, before any file
            net = load_network(model, dev,
                               consensus_model=consensus_model if consensus else None)
        except FapcError as e:
            if debug:
                raise
            _fail(str(e))
        if k is not None:
            try:
                with_near_scale(net, k)
            except ValueError as e:
                _fail(f"--k: {e}", 2)
    opts = NormalsOptions(method=method, k=k, model=model, device=device, orient=orient,
                          batch_size=batch_size, precision=precision, from_mesh=from_mesh,
                          consensus=consensus, consensus_model=consensus_model, crease=crease,
                          light_smoothing=light_smoothing, draws=draws,
                          plane_vote=plane_vote, exact_planes=exact_planes,
                          tile_points=tile_points or None,
                          fields=chosen,
                          drop_invalid=drop_invalid, strict=strict, overwrite=overwrite,
                          ascii=ascii, debug=debug)

    def report(r) -> None:
        if r.status == "failed":
            _error(f"{r.input}: {r.message}")
        elif r.status == "skipped" and not quiet:
            err.print(f"[yellow]skipped:[/] {escape(f'{r.input}: {r.message}')}", highlight=False,
                      soft_wrap=True)
        elif not quiet:
            err.print(f"[green]wrote[/] {escape(str(r.output))} ({r.points:,} points, {r.seconds:.2f} s)",
                      highlight=False, soft_wrap=True)

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from fapc.pipeline import distributed_rank, plan_jobs

    total = len(plan_jobs(inputs, output=output, recursive=recursive))
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[what]}"),
                  TimeElapsedColumn(), console=err, transient=True, disable=quiet) as prog:
        files = prog.add_task("normals", total=total, points=0, what=f"0/{total} files, 0 points")
        current = prog.add_task("", total=1, visible=False, what="")  # the file being estimated

        def report_and_advance(r) -> None:
            report(r)
            done = prog.tasks[files].completed + 1
            points = prog.tasks[files].fields["points"] + r.points
            prog.update(files, advance=1, points=points,
                        what=f"{done:.0f}/{total} files, {points:,} points")
            prog.update(current, visible=False)

        def show_file(name: str, done: int, work: int) -> None:
            prog.update(current, description=escape(Path(name).name), completed=done, total=work,
                        visible=True, what=f"{100 * done / max(work, 1):.0f} %")

        results = run_normals(inputs, opts, output=output, recursive=recursive,
                              on_result=report_and_advance, on_progress=show_file)
    if distributed_rank()[1] == 0:  # under torchrun, rank 0 prints the merged summary
        _summary(results, as_json=as_json, quiet=quiet)
    if any(r.status == "failed" for r in results):
        raise typer.Exit(1)


def _summary(results, *, as_json: bool, quiet: bool) -> None:
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "skipped", "failed")}
    pts = sum(r.points for r in results)
    secs = sum(r.seconds for r in results)
    if as_json:
        out.print_json(json.dumps({
            "files": [r.__dict__ for r in results],
            "ok": counts["ok"], "skipped": counts["skipped"], "failed": counts["failed"],
            "points": pts, "seconds": round(secs, 4)}))
        return
    if quiet:
        return
    t = Table(title="fapc normals", show_edge=False)
    for col in ("files ok", "skipped", "failed", "points", "seconds"):
        t.add_column(col, justify="right")
    t.add_row(str(counts["ok"]), str(counts["skipped"]), str(counts["failed"]), f"{pts:,}",
              f"{secs:.2f}")
    err.print(t)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


# the other commands, in the order --help lists them
from fapc import cli_info  # noqa: E402,F401,I001  (info)
from fapc import cli_train  # noqa: E402,F401,I001  (sample, train, eval)
from fapc import cli_tools  # noqa: E402,F401,I001  (bench, render)

if __name__ == "__main__":
    main()
