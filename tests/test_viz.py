"""Pictures: valid PNGs of the expected size, written atomically."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import viz
from ddpm.schedules import NoiseSchedule


def _open(path) -> Image.Image:
    with Image.open(path) as img:
        img.verify()  # a structurally valid PNG
    img = Image.open(path)
    assert img.format == "PNG"
    return img


def test_to_uint8_maps_the_range_endpoints_and_clips():
    x = torch.tensor([-1.0, 0.0, 1.0, -3.0, 3.0]).reshape(1, 1, 1, 5)
    assert viz.to_uint8(x).ravel().tolist() == [0, 128, 255, 0, 255]


def test_grid_of_8x8_digits_is_upscaled_to_32px_tiles(tmp_path):
    x = torch.rand(64, 1, 8, 8) * 2 - 1
    img = _open(viz.save_image_grid(x, tmp_path / "grid.png"))
    # 8 tiles of 32 px per side, 2 px padding around each
    assert img.size == (2 + 8 * 34, 2 + 8 * 34)
    assert img.mode == "L"


def test_grid_of_colour_images_with_explicit_layout(tmp_path):
    x = np.zeros((6, 3, 32, 32), dtype=np.float32)
    img = _open(viz.save_image_grid(x, tmp_path / "grid.png", nrow=3, scale=1))
    assert img.size == (2 + 3 * 34, 2 + 2 * 34)
    assert img.mode == "RGB"


def test_writes_leave_no_temporary_files(tmp_path):
    viz.save_image_grid(torch.zeros(4, 1, 8, 8), tmp_path / "a.png")
    viz.save_scatter(torch.randn(50, 2), tmp_path / "b.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]


def test_scatter_with_reference_is_a_png(tmp_path):
    img = _open(
        viz.save_scatter(torch.randn(100, 2), tmp_path / "s.png", reference=torch.randn(200, 2))
    )
    assert img.size == (500, 500)


def test_trajectory_has_one_row_per_sample_and_one_column_per_step(tmp_path):
    traj = {i: torch.rand(3, 1, 8, 8) * 2 - 1 for i in (9, 5, 0)}
    traj[-1] = torch.zeros(3, 1, 8, 8)
    img = _open(viz.save_trajectory(traj, tmp_path / "t.png", labels={9: "t=10"}))
    tile = 40  # captioned tiles are at least 40 px
    assert img.size == (2 + 4 * (tile + 2), 14 + 2 + 3 * (tile + 2))


def test_trajectory_of_points_is_a_row_of_scatters(tmp_path):
    traj = {3: torch.randn(100, 2), -1: torch.randn(100, 2)}
    _open(viz.save_trajectory(traj, tmp_path / "t.png"))


def test_forward_process_shows_x0_then_each_requested_step(tmp_path):
    s = NoiseSchedule.from_name("linear", 100)
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    img = _open(viz.save_forward_process(s, x0, tmp_path / "f.png", steps=[0, 49, 99]))
    assert img.size == (2 + 4 * 42, 14 + 2 + 2 * 42)


def test_forward_process_rejects_steps_outside_the_chain(tmp_path):
    s = NoiseSchedule.from_name("linear", 100)
    with pytest.raises(ValueError, match="steps must lie"):
        viz.save_forward_process(s, torch.zeros(1, 1, 8, 8), tmp_path / "f.png", steps=[100])


def test_loss_plot_from_a_log(tmp_path):
    log = tmp_path / "log.csv"
    rows = "\n".join(f"{s},{1 / s:.4f},0.001,1.0,100,{s}" for s in range(5, 200, 5))
    log.write_text("step,loss,lr,grad_norm,images_per_s,elapsed_s\n" + rows + "\n")
    img = _open(viz.plot_loss(log, tmp_path / "loss.png"))
    assert img.size == (600, 400)
