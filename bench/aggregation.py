"""FedAvg aggregation of N updates of a FEMNIST-size CNN (6.6 M parameters), against the floor: a plain
NumPy weighted sum of the same arrays, in the same process, in the same loop.

Each update arrives as a safetensors body and is decoded as the server decodes it (untimed: that is
ingestion); fedge folds it into its running sum (``fedge.server.aggregation.fold``) and the floor adds
``weight * x`` into its own float64 sum. After the last update, fedge finishes the version as the server
does: the mean, the canonical body, its sha256, written durably to a model store. Each N runs in a fresh
process, so its peak RSS is its own: with streaming folds it should not grow with N.
"""

from __future__ import annotations

import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = [25, 100, 200]
QUICK_SIZES = [2, 4]
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
    floor = {k: np.zeros(v.shape, np.float64) for k, v in model.items()}
    fold_seconds = floor_seconds = 0.0
    for i in range(n):
        tensors, _ = decode(bodies[i % DISTINCT])
        started = time.perf_counter()
        for name, x in tensors.items():
            floor[name] += weights[i] * x
        floor_seconds += time.perf_counter() - started
        arrived = time.perf_counter()
        aggregation.fold(acc, tensors, float(weights[i]))
        fold_seconds += time.perf_counter() - arrived
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp))
        average = aggregation.average(acc, model)
        body = encode(average, {"round": "1"})
        encoded = time.perf_counter()
        store.put_model(body)
        after_last = time.perf_counter() - arrived
        write = time.perf_counter() - encoded
        store.close()
    floor_mean = {k: v / weights.sum() for k, v in floor.items()}
    assert all(np.allclose(average[k], floor_mean[k], atol=1e-6) for k in model), "fedge and floor disagree"
    return {
        "n": n,
        "params": int(sum(v.size for v in model.values())),
        "after_last_ms": round(after_last * 1000, 1),
        "total_s": round(fold_seconds, 3),
        "numpy_floor_s": round(floor_seconds, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "durable_write_ms": round(write * 1000, 1),  # part of after_last: sha256, write, fsync
        "model_sha256": sha256(body),
    }


def render(result: dict) -> str:
    lines = [
        "FedAvg over N updates of a FEMNIST-size CNN; fedge's streaming fold against a plain NumPy weighted",
        "sum of the same arrays in the same loop. *After last*: from the last update's arrival to the new",
        "version (fold, mean, canonical body, then sha256, write and fsync of the 26 MB model, shown apart).",
        "Goals: after last <= 50 ms, total within 1.5x of the floor, peak memory flat in N.",
        "",
        "| N | parameters | after last (ms) | of which durable write (ms) | fold total (s) | NumPy floor (s) "
        "| fold / floor | peak RSS (MB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        ratio = row["total_s"] / row["numpy_floor_s"] if row["numpy_floor_s"] else float("nan")
        lines.append(
            f"| {row['n']} | {row['params']:,} | {row['after_last_ms']:.0f} | {row['durable_write_ms']:.0f} "
            f"| {row['total_s']:.2f} | {row['numpy_floor_s']:.2f} | {ratio:.2f}x | {row['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)
