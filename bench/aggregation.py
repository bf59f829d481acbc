"""FedAvg aggregation of N updates of a FEMNIST-size CNN (6.6 M parameters), against the floor: an
in-place NumPy weighted sum of the same arrays into a float64 sum, in the same process, in the same loop.

Each update arrives as a safetensors body and is decoded as the server decodes it (untimed: that is
ingestion); fedge folds it into its running sum (``fedge.server.aggregation.fold``) and the floor adds
``weight * x`` into its own float64 sum with no temporary array, two plain ways, each timed, the faster
taken per update: ``np.multiply(x, w, out=scratch)`` then ``np.add(total, scratch, out=total)`` over whole
arrays, and the same in cache-sized blocks (a float64 BLAS axpy would first need a float64 copy of each
float32 update, more memory traffic than either). fedge and the floor alternate per update, and which
goes first alternates too, so drift in the machine's load hits both alike. After the last update, fedge
finishes the version as the server does: the mean, the canonical body, its sha256, written durably to a
model store. Each N runs in a fresh process, so its peak RSS is its own: with streaming folds it should
not grow with N.
"""

from __future__ import annotations

import multiprocessing
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SIZES = [25, 100, 200]
QUICK_SIZES = [2, 4]
BLOCK = 1 << 15  # the floor's cache-sized blocks
DISTINCT = 4  # distinct update bodies, cycled: 200 distinct ones would need 5 GB of input


def femnist_cnn() -> dict[str, tuple[int, ...]]:
    """LEAF's FEMNIST CNN: two 5x5 convolutions (32, 64), a 2048-unit dense layer, 62 classes."""
    return {
        "conv1.weight": (32, 1, 5, 5),
        "conv1.bias": (32,),
        "conv2.weight": (64, 32, 5, 5),
        "conv2.bias": (64,),
        "fc1.weight": (2048, 3136),
        "fc1.bias": (2048,),
        "fc2.weight": (62, 2048),
        "fc2.bias": (62,),
    }


def run(quick: bool) -> dict:
    context = multiprocessing.get_context("spawn")
    rows = []
    for n in QUICK_SIZES if quick else SIZES:
        with context.Pool(1) as pool:
            rows.append(pool.apply(measure, (n,)))
    return {"rows": rows}


def measure(n: int) -> dict:
    from fedge.codec import decode, encode, sha256
    from fedge.server import aggregation
    from fedge.server.store import Store

    rng = np.random.default_rng(0)
    model = {k: rng.normal(0, 0.05, s).astype(np.float32) for k, s in femnist_cnn().items()}
    bodies = [
        encode({k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in model.items()})
        for _ in range(DISTINCT)
    ]
    weights = rng.integers(10, 500, n).astype(float)

    acc = aggregation.start(model)
    whole = {k: np.zeros(v.shape, np.float64) for k, v in model.items()}
    blocked = {k: np.zeros(v.shape, np.float64) for k, v in model.items()}
    scratch = {k: np.empty(v.shape, np.float32) for k, v in model.items()}

    def whole_fold(tensors: dict[str, np.ndarray], weight: float) -> None:
        for name, x in tensors.items():
            np.multiply(x, weight, out=scratch[name])
            np.add(whole[name], scratch[name], out=whole[name])

    def blocked_fold(tensors: dict[str, np.ndarray], weight: float) -> None:
        for name, x in tensors.items():
            flat, part = blocked[name].reshape(-1), scratch[name].reshape(-1)[:BLOCK]
            for begin in range(0, flat.size, BLOCK):
                out, product = flat[begin : begin + BLOCK], part[: min(BLOCK, flat.size - begin)]
                np.multiply(x.reshape(-1)[begin : begin + BLOCK], weight, out=product)
                np.add(out, product, out=out)

    def floor_fold(tensors: dict[str, np.ndarray], weight: float) -> None:
        """The faster of the two plain ways, each timed on its own sum."""
        times: list[float] = []
        timed(times, whole_fold, tensors, weight)
        timed(times, blocked_fold, tensors, weight)
        floor_times.append(min(times))

    def fedge_fold(tensors: dict[str, np.ndarray], weight: float) -> None:
        aggregation.fold(acc, tensors, weight)

    def timed(times: list[float], call: Callable[[dict[str, np.ndarray], float], None], *args: Any) -> None:
        began = time.perf_counter()
        call(*args)
        times.append(time.perf_counter() - began)

    fold_times: list[float] = []
    floor_times: list[float] = []
    arrived = 0.0
    for i in range(n):
        tensors, _ = decode(bodies[i % DISTINCT])
        weight = float(weights[i])
        fedge_first = i % 2 == 1 and i != n - 1  # the last update's fold starts the after-last clock
        if not fedge_first:
            floor_fold(tensors, weight)
        arrived = time.perf_counter()
        timed(fold_times, fedge_fold, tensors, weight)
        if fedge_first:
            floor_fold(tensors, weight)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp))
        folded = time.perf_counter()
        average = aggregation.average(acc, model)
        averaged = time.perf_counter()
        body = encode(average, {"round": "1"})
        encoded = time.perf_counter()
        store.put_model(body)
        after_last = time.perf_counter() - arrived
        write = time.perf_counter() - encoded
        store.close()
    for floor in (whole, blocked):
        mean = {k: v / weights.sum() for k, v in floor.items()}
        assert all(np.allclose(average[k], mean[k], atol=1e-6) for k in model), "fedge and floor disagree"
    return {
        "n": n,
        "params": int(sum(v.size for v in model.values())),
        "after_last_ms": round(after_last * 1000, 1),
        "total_s": round(sum(fold_times), 3),
        "numpy_floor_s": round(sum(floor_times), 3),
        "fold_over_floor": _spread([a / b for a, b in zip(fold_times, floor_times, strict=True)]),
        "after_last_minus_write_ms": round((after_last - write) * 1000, 1),
        "last_fold_ms": round((folded - arrived) * 1000, 1),  # the parts of after-last minus write
        "mean_ms": round((averaged - folded) * 1000, 1),
        "encode_ms": round((encoded - averaged) * 1000, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "durable_write_ms": round(write * 1000, 1),  # part of after_last: sha256, write, fsync
        "model_sha256": sha256(body),
    }


def _spread(values: list[float]) -> dict[str, float]:
    """min / median / max of per-update ratios."""
    return {k: round(f(values), 3) for k, f in (("min", min), ("median", statistics.median), ("max", max))}


def render(result: dict) -> str:
    lines = [
        "FedAvg over N updates of a FEMNIST-size CNN; fedge's streaming fold against an in-place NumPy",
        "weighted sum (no temporaries) of the same arrays in the same loop, alternating per update. *After",
        "last*: from the last update's arrival to the new version (fold, mean, canonical body, then sha256,",
        "write and fsync of the 26 MB model, shown apart). Goals: after last minus the durable write",
        "<= 10 ms, fold within 1.1x of the floor, peak memory flat in N.",
        "",
        "| N | parameters | after last (ms) | of which durable write (ms) | after last minus write (ms) "
        "| fold total (s) | NumPy floor (s) | fold / floor | per update min / median / max | peak RSS (MB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in result["rows"]:
        ratio = row["total_s"] / row["numpy_floor_s"] if row["numpy_floor_s"] else float("nan")
        spread = " / ".join(f"{row['fold_over_floor'][k]:.2f}" for k in ("min", "median", "max"))
        lines.append(
            f"| {row['n']} | {row['params']:,} | {row['after_last_ms']:.0f} | {row['durable_write_ms']:.0f} "
            f"| {row['after_last_minus_write_ms']:.0f} | {row['total_s']:.2f} | {row['numpy_floor_s']:.2f} "
            f"| {ratio:.2f}x | {spread} | {row['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)
