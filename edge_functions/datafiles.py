"""A device's own examples from the files an owner has: an ``.npz`` (arrays ``x`` and ``y``), a CSV (one
example a row, the label in the column named, else the last), or a folder of images in one subfolder per
class (the classes numbered in sorted order of their names). Read without pickle, into (x float32, y int64).

What is wrong with a file is one line (``DataError``), said at agent start rather than at each round.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

ZIP_MAGIC = b"PK\x03\x04"  # an .npz is a zip archive of .npy files
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

Examples = tuple[np.ndarray, np.ndarray]


class DataError(ValueError):
    pass


def load(path: Path, label: str | None = None) -> Examples:
    """The examples at ``path``, by what it is: a folder of class folders, a CSV, or an .npz."""
    if path.is_dir():
        return _images(path)
    if not path.is_file():
        raise DataError(f"cannot read data {path}: it does not exist")
    if path.suffix.lower() == ".csv":
        return _csv(path, label)
    with path.open("rb") as f:
        if f.read(len(ZIP_MAGIC)) != ZIP_MAGIC:
            raise DataError(
                f"{path} is not an .npz archive (numpy.savez) with arrays x and y, a .csv, nor a folder"
            )
    try:
        with np.load(path, allow_pickle=False) as arrays:
            if "x" not in arrays or "y" not in arrays:
                raise DataError(f"{path} needs arrays x and y")
            x, y = arrays["x"], arrays["y"]
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read data {path}: {exc}") from None
    return _pair(path, x, y)


def _pair(path: Path, x: np.ndarray, y: np.ndarray) -> Examples:
    if len(x) != len(y):
        raise DataError(f"{path}: {len(x)} inputs but {len(y)} labels")
    if len(y) == 0:
        raise DataError(f"{path} holds no examples")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: labels must be whole numbers (class indices), not {y.dtype}")
    try:
        return x.astype(np.float32), y.astype(np.int64)
    except ValueError as exc:
        raise DataError(f"{path}: inputs are not numbers: {exc}") from None


def _csv(path: Path, label: str | None) -> Examples:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2:
        raise DataError(f"{path} needs a header row and at least one example")
    header, body = rows[0], rows[1:]
    if label is not None and label not in header:
        raise DataError(f"{path} has no column {label!r}: its columns are {', '.join(header)}")
    column = header.index(label) if label is not None else len(header) - 1
    try:
        table = np.array(body, dtype=np.float64)
    except ValueError:
        raise DataError(f"{path}: every value must be a number (one row has something else)") from None
    if table.ndim != 2 or table.shape[1] != len(header):
        raise DataError(f"{path}: every row needs {len(header)} values, as the header has")
    labels = table[:, column]
    if not np.array_equal(labels, np.round(labels)):
        raise DataError(f"{path}: the label column {header[column]!r} must hold whole numbers")
    return _pair(path, np.delete(table, column, axis=1), labels.astype(np.int64))


def _images(folder: Path) -> Examples:
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{folder} needs one subfolder of images per class")
    xs, ys = [], []
    for index, class_dir in enumerate(classes):
        for file in sorted(class_dir.iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as image:
                    pixels = np.asarray(image.convert("L" if image.mode in ("1", "L", "P") else "RGB"))
            except (OSError, UnidentifiedImageError) as exc:
                raise DataError(f"cannot read image {file}: {exc}") from None
            xs.append(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))
            ys.append(index)
    if not xs:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    if len({x.shape for x in xs}) > 1:
        raise DataError(f"{folder}: images differ in size ({sorted({x.shape for x in xs})[:2]}...)")
    return np.stack(xs).astype(np.float32) / 255.0, np.array(ys, dtype=np.int64)
