"""Cold versus warm invocations of ``train`` for the demo model (MNIST LeNet-5, one client's 400 digits).

Cold: the start-up an invocation waits for in a fresh worker (spawn, ``import torch``, fedge's function
module), against a bare ``python -c "import torch"`` measured in the same run. Goal: at most 1.2x.
Warm: an invocation's wall time on a warm worker, as the agent makes it (the model named by the round's
announcement and cached by sha256, the update kept in the outbox with fsync) minus the training itself
(the same ``fit`` on the same data, in this process). Goal: under 20 ms.
"""

from __future__ import annotations

import operator
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import loopback_pki
from fedge.edge_functions import datasets
from fedge.edge_functions.events import CredentialPaths, LocalData, TrainEvent
from fedge.edge_functions.runtime import WarmPool
from fedge.server.launcher import launch
from fedge.transport import FedgeClient
from fedge.wire import TrainConfig

EXAMPLES = 400
WARM_PER_WORKER = 5


def _import_torch() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.perf_counter() - started


class _BareFit:
    """The training alone, as a warm worker runs it: same threads, torch warmed up by a first fit."""

    def __init__(self, x: np.ndarray, y: np.ndarray, model_body: bytes) -> None:
        import torch

        from fedge.codec import decode

        torch.set_num_threads(os.cpu_count() or 1)  # what the worker of a pool of one uses
        self.x, self.y, self.tensors = x, y, decode(model_body)[0]
        self()

    def __call__(self) -> float:
        from fedge.edge_functions import functions, tasks

        model = tasks.get("mnist").build_model()
        tasks.load_tensors(model, self.tensors)
        started = time.perf_counter()
        functions.fit(model, self.x, self.y, TrainConfig())
        return time.perf_counter() - started


def run(quick: bool) -> dict:
    repeats = 1 if quick else 5
    with tempfile.TemporaryDirectory(prefix="fedge-bench-") as tmp:
        work = Path(tmp)
        (creds,) = loopback_pki.make(work / "pki", ["device"])
        digits = datasets.load("mnist")
        x, y = digits.x_train[:EXAMPLES], digits.y_train[:EXAMPLES]
        np.savez(work / "data.npz", x=x, y=y)
        server = launch(
            ["--pki", str(work / "pki"), "--port", "0", "--task", "mnist", "--rounds", "1"],
            work / "server",
            work / "server.log",
            timeout=180,
        )
        with FedgeClient(server.url, creds) as api:
            model = api.model()
        assert model is not None
        event = TrainEvent(
            server=server.url,
            credentials=CredentialPaths.of(creds),
            task="mnist",
            round=1,
            config=TrainConfig(),
            data=LocalData(path=work / "data.npz"),
            outbox=work / "outbox",  # keep the update: every repeat trains the same round
            model_sha256=model.sha256,  # as the agent passes it on from the round's announcement
        )
        try:
            bare_fit = _BareFit(x, y, model.body)
            baseline = [_import_torch() for _ in range(repeats)]
            cold, cold_wall, warm_wall, warm_function, fits = [], [], [], [], []
            for _ in range(repeats):
                pool = WarmPool(1)
                try:
                    started = time.perf_counter()
                    first = pool.invoke("train", event).result()
                    cold_wall.append(time.perf_counter() - started)
                    cold.append(first.startup_seconds)
                    for _ in range(WARM_PER_WORKER):  # alternate with the bare fit: both see the same load
                        started = time.perf_counter()
                        warm = pool.invoke("train", event).result()
                        warm_wall.append(time.perf_counter() - started)
                        warm_function.append(warm.seconds)
                        fits.append(bare_fit())
                finally:
                    pool.close()
        finally:
            server.stop()
    import_torch = statistics.median(baseline)
    fit = statistics.median(fits)
    return {
        "repeats": repeats,
        "examples": EXAMPLES,
        "import_torch_s": import_torch,
        "cold_startup_s": statistics.median(cold),
        "cold_invocation_s": statistics.median(cold_wall),
        "cold_ratio": statistics.median(cold) / import_torch,
        "warm_invocation_s": statistics.median(warm_wall),
        "bare_fit_s": fit,
        "warm_overhead_ms": (statistics.median(warm_wall) - fit) * 1000,
        "dispatch_overhead_ms": statistics.median(map(operator.sub, warm_wall, warm_function)) * 1000,
    }


def render(result: dict) -> str:
    return (
        "| measure | value | goal |\n|---|---|---|\n"
        f"| bare `import torch` (fresh interpreter) | {result['import_torch_s']:.2f} s | baseline |\n"
        f"| cold start-up of a worker | {result['cold_startup_s']:.2f} s | |\n"
        f"| cold start-up / `import torch` | **{result['cold_ratio']:.2f}x** | at most 1.2x |\n"
        f"| cold `train` invocation, all in | {result['cold_invocation_s']:.2f} s | |\n"
        f"| warm `train` invocation | {result['warm_invocation_s'] * 1000:.0f} ms | |\n"
        f"| the training itself (same `fit`) | {result['bare_fit_s'] * 1000:.0f} ms | baseline |\n"
        f"| warm overhead over the training | **{result['warm_overhead_ms']:.1f} ms** | under 20 ms |\n"
        f"| of which the pool's dispatch (pipe, thread) | {result['dispatch_overhead_ms']:.1f} ms | |\n"
        f"\nMedians of {result['repeats']} cold and {WARM_PER_WORKER * result['repeats']} warm invocations; "
        f"{result['examples']} MNIST digits, one local epoch.\n"
    )
