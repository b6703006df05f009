"""fapc render: image statistics, not golden bytes; the picture follows the normals."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import sphere_points
from typer.testing import CliRunner

from fapc.cli import app
from fapc.cloud import PointCloud
from fapc.io import write_cloud
from fapc.render import render

matplotlib = pytest.importorskip("matplotlib")


def _img(path) -> np.ndarray:
    import matplotlib.image as mpimg

    return mpimg.imread(str(path))[..., :3]


def test_render_draws_the_cloud_and_follows_the_normals(tmp_path):
    pts = sphere_points(5000)
    render(pts, tmp_path / "a.png", normals=pts)
    render(pts, tmp_path / "b.png", normals=np.tile([1.0, 0.0, 0.0], (5000, 1)))
    a, b = _img(tmp_path / "a.png"), _img(tmp_path / "b.png")
    assert a.shape == b.shape and a.shape[1] > a.shape[0]  # several views side by side
    ink = (a < 0.95).any(-1)
    assert 0.02 < ink.mean() < 0.6  # points drawn, not a blank or a filled canvas
    assert np.abs(a - b).mean() > 0.01  # other normals, another picture
    # radial normals: many hues; one constant normal: one hue (shading changes brightness only)

    def red_share(img):
        px = img[(img < 0.9).any(-1)]
        return np.mean((px[:, 0] > px[:, 1] + 0.02) & (px[:, 0] > px[:, 2] + 0.02))

    assert red_share(b) > 0.9 and red_share(a) < 0.6


def test_render_field_and_cli(tmp_path):
    pts = sphere_points(3000)
    write_cloud(tmp_path / "c.ply", PointCloud(points=pts, normals=pts,
                                               attributes={"conf": pts[:, 2].astype(np.float32)}))
    runner = CliRunner()
    r = runner.invoke(app, ["render", str(tmp_path / "c.ply"), "-o", str(tmp_path / "f.png"),
                            "--color", "conf", "--views", "front"])
    assert r.exit_code == 0, r.output
    img = _img(tmp_path / "f.png")
    ink = (img < 0.95).any(-1)
    top, bottom = img[: img.shape[0] // 2][ink[: img.shape[0] // 2]], img[img.shape[0] // 2:][
        ink[img.shape[0] // 2:]]
    assert np.abs(top.mean(0) - bottom.mean(0)).sum() > 0.1  # the field varies with height
    r = runner.invoke(app, ["render", str(tmp_path / "c.ply"), "--color", "nope"])
    assert r.exit_code == 1 and "no field 'nope'" in r.stderr
