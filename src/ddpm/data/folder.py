"""A folder of PNG / JPEG images, found recursively; class labels from the first-level subfolders.

Images are read in sorted path order. If every image lies inside a subfolder of ``root``, the label of
an image is the index of its first-level subfolder in sorted order (as torchvision's ImageFolder);
otherwise there are no labels. Hidden files and folders (".name") are skipped.

Modes: 1 / L -> gray; LA, RGBA and P with transparency are composited over white; P, CMYK, YCbCr ->
RGB; 16-bit gray (I;16) is scaled to 8 bits. The data set has 1 channel if every image is gray (or RGB
with equal channels), else 3. With ``image_size`` the shorter side is resized to it (bicubic) and the
center square cropped; without it, all images must share one size, which is kept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ddpm.data.dataset import ArrayDataset
from ddpm.data.transforms import bytes_to_unit
from ddpm.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_RGB_MODES = ("RGB", "P", "CMYK", "YCbCr")
_ALPHA_MODES = ("LA", "La", "RGBA", "RGBa", "PA")


def list_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursively, skipping hidden names), sorted."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and p.is_file()
    )


def read_image(path: Path, image_size: int | None) -> np.ndarray:
    """uint8 [H, W] (gray) or [H, W, 3] (colour), resized and center-cropped if ``image_size``."""
    from PIL import Image

    if path.stat().st_size == 0:
        raise DataError(f"empty image file (0 bytes): {path}")
    try:
        with Image.open(path) as img:
            img.load()
            img = to_gray_or_rgb(img, path)
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e
    if image_size is not None:
        img = _resize_center_crop(img, image_size)
    return np.asarray(img, dtype=np.uint8)


def to_gray_or_rgb(img, path: Path):
    """A PIL image in mode L or RGB (see the module docstring), or DataError for other modes."""
    from PIL import Image

    mode = img.mode
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("1", "L"):
        return img.convert("L")
    if mode.startswith("I;16"):
        # 16-bit gray: PIL's convert("L") would clip at 255 rather than rescale.
        a = np.asarray(img).astype(np.float64)
        return Image.fromarray(np.round(a / 257.0).astype(np.uint8))
    if mode in _ALPHA_MODES:
        # Transparent pixels become white, as an image viewer on a white page shows them.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        out = Image.alpha_composite(white, rgba)
        return out.convert("L") if mode in ("LA", "La") else out.convert("RGB")
    if mode in _RGB_MODES:
        return img.convert("RGB")
    raise DataError(f"unsupported image mode {mode} (use 8-bit gray, RGB or RGBA): {path}")


def _resize_center_crop(img, size: int):
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_folder(
    *, split: str, root=None, image_size: int | None = None, **_: object
) -> ArrayDataset:
    """Every image under ``root`` as [N, C, H, W], 8-bit values k scaled to k / 255 * 2 - 1."""
    if root is None:
        raise ConfigError("folder data needs a root: the folder of images (--data-root DIR)")
    if split == "test":
        raise ConfigError("folder data has one split: use split 'train' or 'all'")
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"image folder {root} {what}")
    paths = list_images(root)
    if not paths:
        raise DataError(f"no PNG or JPEG images in {root}")
    arrays = [read_image(p, image_size) for p in paths]
    sizes = sorted({a.shape[:2] for a in arrays})
    if len(sizes) > 1:
        shown = ", ".join(f"{h}x{w}" for h, w in sizes[:4]) + (", ..." if len(sizes) > 4 else "")
        raise DataError(
            f"images in {root} have different sizes (HxW {shown}); pass an image size "
            "(--image-size N) to resize and center-crop them"
        )
    if all(_is_gray(a) for a in arrays):
        stacked = np.stack([a if a.ndim == 2 else a[..., 0] for a in arrays])[:, None]
    else:
        stacked = np.stack([a if a.ndim == 3 else np.repeat(a[..., None], 3, -1) for a in arrays])
        stacked = stacked.transpose(0, 3, 1, 2)
    x = bytes_to_unit(np.ascontiguousarray(stacked))
    y, classes = _labels(root, paths)
    return ArrayDataset(
        x=x,
        y=y,
        name="folder",
        num_classes=None if classes is None else len(classes),
        class_names=classes,
    )


def _is_gray(a: np.ndarray) -> bool:
    return a.ndim == 2 or bool((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all())


def _labels(root: Path, paths: list[Path]) -> tuple[torch.Tensor | None, tuple[str, ...] | None]:
    first = [p.relative_to(root).parts for p in paths]
    if any(len(parts) < 2 for parts in first):
        return None, None
    classes = tuple(sorted({parts[0] for parts in first}))
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[parts[0]] for parts in first], dtype=torch.int64), classes
