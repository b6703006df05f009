"""Batch processing behind ``fapc normals``: inputs -> outputs, one file at a time.

Each file is read, checked, estimated and written atomically; a failure is recorded as a
one-line reason and the batch goes on.
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from fapc.errors import FapcError
from fapc.io import READ_EXTENSIONS, WRITE_EXTENSIONS, read_cloud, writable_extension, write_cloud
from fapc.io.e57 import point_viewpoints
from fapc.tiles import TILE_POINTS

log = logging.getLogger(__name__)

ALL_FIELDS = ("normals", "confidence", "curvature")


@dataclass
class NormalsOptions:
    """Settings of one ``fapc normals`` run (see ``fapc normals --help``)."""

    method: str = "fa"
    k: int | None = None  # pca: [normals.PCA_K]; fa: the near scale [the model's]
    model: str | None = None
    device: str = "auto"
    batch_size: int | None = None  # per device: runtime.default_batch_size
    precision: str = "auto"
    consensus: bool = True  # fa: snap at creases, smooth under heavy noise
    consensus_model: str | None = None  # the learned smoothing's weights [shipped]
    crease: bool = False  # fa: under light noise, points near a sharp edge take their face
    light_smoothing: bool | None = None  # fa: light noise: refit from nearest normals [model's choice]
    draws: int | None = None  # fa: far-scale draws averaged [the model's choice per cloud]
    plane_vote: bool | None = None  # fa: noiseless: the plane vote [the model's choice per cloud]
    exact_planes: bool | None = None  # fa: noiseless meshes: exact planes [the model's choice]
    tile_points: int | None = TILE_POINTS  # fa: larger clouds in tiles (fapc.tiles); None: never
    from_mesh: str | None = None
    orient: str = "none"
    fields: tuple[str, ...] = ALL_FIELDS
    drop_invalid: bool = False
    strict: bool = False
    overwrite: bool = False
    ascii: bool = False
    debug: bool = False


@dataclass
class FileResult:
    """What happened to one input: ``status`` is ``ok``, ``skipped`` or ``failed``."""

    input: str
    output: str | None
    status: str
    points: int = 0
    seconds: float = 0.0
    message: str = ""
    warnings: list[str] = field(default_factory=list)


@dataclass
class Job:
    input: str
    output: str | None
    error: str | None = None


def _is_own_output(name: str) -> bool:
    return ".normals." in os.path.basename(name)


def _cloud_files(folder: str, recursive: bool) -> list[str]:
    found = []
    if recursive:
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            found += [os.path.join(root, f) for f in sorted(files)]
    else:
        found = [os.path.join(folder, f) for f in sorted(os.listdir(folder))
                 if os.path.isfile(os.path.join(folder, f)) or os.path.islink(os.path.join(folder, f))]
    return [f for f in found if os.path.splitext(f)[1].lower() in READ_EXTENSIONS
            and not _is_own_output(f)]


def _output_ext(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    return ext if ext in WRITE_EXTENSIONS else ".ply"


def plan_jobs(
    inputs: Iterable[str], *, output: str | None = None, recursive: bool = False
) -> list[Job]:
    """Expand files, directories and globs, and decide each output path.

    ``output`` is a directory when it exists as one, ends with a path separator, has no
    extension (``-o out``; unless a file of that name exists), or more than one input file
    results; there the input names are mirrored (``scan.ply`` ->
    ``OUT/scan.ply``, files under a directory argument keep their relative path). Otherwise
    it is the output file. With no ``output``, ``scan.normals.ply`` is written beside
    ``scan.ply``.
    """
    pairs: list[tuple[str, str | None, str | None]] = []  # (file, base dir, error)
    for arg in inputs:
        if os.path.isdir(arg):
            files = _cloud_files(arg, recursive)
            if not files:
                pairs.append((arg, None, "directory holds no point-cloud files"))
            pairs += [(f, arg, None) for f in files]
        elif not os.path.lexists(arg) and any(ch in arg for ch in "*?["):
            files = sorted(glob.glob(arg, recursive=recursive))
            files = [f for f in files if os.path.isfile(f)]
            if not files:
                pairs.append((arg, None, "no file matches this pattern"))
            pairs += [(f, None, None) for f in files]
        else:
            pairs.append((arg, None, None))
    n_files = sum(1 for _, _, e in pairs if e is None)
    out_is_dir = output is not None and (
        os.path.isdir(output) or output.endswith(("/", os.sep)) or n_files > 1
        or (not os.path.splitext(output)[1] and not os.path.lexists(output)))
    jobs = []
    for f, base, err in pairs:
        if err is not None:
            jobs.append(Job(f, None, err))
            continue
        if output is None:
            stem, ext = os.path.splitext(f)
            out = f"{stem}.normals{_output_ext(f)}"
        elif out_is_dir:
            rel = os.path.relpath(f, base) if base else os.path.basename(f)
            out = os.path.join(output, os.path.splitext(rel)[0] + _output_ext(f))
        else:
            out = output
        jobs.append(Job(f, out))
    return jobs


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def process_file(job: Job, opts: NormalsOptions, *,
                 progress: Callable[[int, int], None] | None = None) -> FileResult:
    """Read, estimate and write one file; a :class:`FapcError` becomes a failed result.
    ``progress(done, total)``: the estimate's progress (:func:`fapc.estimate_normals`)."""
    t0 = time.perf_counter()
    res = FileResult(job.input, job.output, "failed")
    try:
        if job.error:
            raise FapcError(job.error, path=job.input)
        assert job.output is not None
        writable_extension(job.output)  # before the work, not after it
        if _same_file(job.input, job.output):
            raise FapcError("output would overwrite the input; choose another -o",
                            path=job.input)
        if os.path.exists(job.output) and not opts.overwrite:
            res.status = "skipped"
            res.message = f"output exists: {job.output} (use --overwrite)"
            return res
        cloud = read_cloud(job.input, from_mesh=opts.from_mesh)
        finite = np.isfinite(cloud.points).all(axis=1)
        n_bad = int((~finite).sum())
        if n_bad == len(cloud):
            raise FapcError("no finite point", path=job.input)
        if n_bad:
            if opts.strict:
                raise FapcError(f"{n_bad} points have NaN/inf coordinates (--strict)",
                                path=job.input)
            if opts.drop_invalid:
                cloud = cloud.subset(finite)
                res.warnings.append(f"dropped {n_bad} points with NaN/inf coordinates")
            else:
                res.warnings.append(f"{n_bad} points with NaN/inf coordinates kept with a zero "
                                    "normal and zero confidence")
        from fapc.normals import estimate_normals

        try:
            est = estimate_normals(cloud.points, method=opts.method, k=opts.k, model=opts.model,
                                   device=opts.device, batch_size=opts.batch_size,
                                   precision=opts.precision,
                                   consensus=opts.consensus,
                                   consensus_model=opts.consensus_model,
                                   crease=opts.crease,
                                   light_smoothing=opts.light_smoothing,
                                   draws=opts.draws, plane_vote=opts.plane_vote,
                                   exact_planes=opts.exact_planes,
                                   tile_points=opts.tile_points, progress=progress)
        except FapcError as e:
            raise FapcError(e.reason, path=job.input) from None
        if opts.orient != "none":
            from fapc.orient import orient_spec

            ok = est.valid
            # a bare viewpoint: the file's own sensor position(s), or None
            vp = point_viewpoints(cloud) if opts.orient == "viewpoint" else None
            if opts.orient == "viewpoint" and vp is None:
                res.warnings.append("the file records no sensor position: normals face the "
                                    "origin (give one with --orient viewpoint:x,y,z)")
            if vp is not None and vp.ndim == 2:
                vp = vp[ok]
            est.normals[ok] = orient_spec(cloud.points[ok].astype(np.float64), est.normals[ok],
                                          opts.orient, file_viewpoint=vp)
        if "normals" in opts.fields:
            cloud.normals = est.normals
        if "confidence" in opts.fields:
            cloud.attributes["confidence"] = est.confidence
        if "curvature" in opts.fields:
            cloud.attributes["curvature"] = est.curvature
        write_cloud(job.output, cloud, ascii=opts.ascii)
        res.status, res.points = "ok", len(cloud)
    except FapcError as e:
        if opts.debug:
            raise
        res.message = e.reason if e.path == job.input else str(e)
    except Exception as e:  # an unexpected bug: still one line per file, unless --debug
        if opts.debug:
            raise
        res.message = f"internal error: {type(e).__name__}: {e}".splitlines()[0]
    finally:
        res.seconds = time.perf_counter() - t0
    return res


def run_normals(
    inputs: Iterable[str],
    opts: NormalsOptions,
    *,
    output: str | None = None,
    recursive: bool = False,
    on_result: Callable[[FileResult], None] | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> list[FileResult]:
    """Run ``fapc normals`` over ``inputs``; returns one :class:`FileResult` per job.
    ``on_result(result)`` after each file; ``on_progress(input, done, total)`` as each
    file's estimate goes on (in points of work, see :func:`fapc.estimate_normals`).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the jobs are split across the ranks (rank ``r``
    takes jobs ``r, r + W, ...``, each on its own GPU when there are GPUs), every file is
    written once, and every rank returns the merged results in input order.
    """
    jobs = plan_jobs(inputs, output=output, recursive=recursive)
    world, rank = distributed_rank()
    if world > 1:
        import dataclasses

        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="gloo")  # results only: small objects
        if opts.device in ("auto", "cuda") and torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            opts = dataclasses.replace(opts, device=f"cuda:{local}")
        mine = list(range(rank, len(jobs), world))
    else:
        mine = list(range(len(jobs)))
    results: list[tuple[int, FileResult]] = []
    for i in mine:
        tell = None if on_progress is None else functools.partial(on_progress, jobs[i].input)
        r = process_file(jobs[i], opts, progress=tell)
        for w in r.warnings:
            log.warning("%s: %s", r.input, w)
        results.append((i, r))
        if on_result:
            on_result(r)
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, results)
        dist.destroy_process_group()
        results = sorted((item for part in gathered for item in part), key=lambda t: t[0])
    return [r for _, r in results]


def distributed_rank() -> tuple[int, int]:
    """``(world size, rank)`` from torchrun's environment (``(1, 0)`` without it)."""
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
