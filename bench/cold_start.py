"""Cold versus warm invocations of ``train`` for the demo model (MNIST LeNet-5, one client's 400 digits), on
both runtimes side by side: warm worker processes and warm containers (``edge_functions.containers``).

Cold: the start-up an invocation waits for in a fresh instance (a worker: spawn, ``import torch``, fedge's
function module; a container: Docker's create and start, then the same in the image), against a bare
``python -c "import torch"`` measured in the same run. Goals: a worker at most 1.2x, a container 1.3x.
Warm: an invocation's wall time on a warm instance, as the agent makes it (the model named by the round's
announcement and cached by sha256, the update kept in the outbox with fsync) minus the training itself
(the same ``fit`` on the same data, in this process). Goals: under 20 ms on a worker; on a container,
under 1.5x a worker's. Each repeat measures the bare import, a cold start on each runtime, then warm
invocations on each in turn with a bare fit after each pair: interleaved, so both see the same load (the
order alternates between repeats). Without a Docker daemon or the image (``FEDGE_IMAGE``, default
``fedge/agent:<version>``), the container side is skipped and says why.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench import loopback_pki
from fedge.edge_functions import containers, datasets
from fedge.edge_functions.events import CredentialPaths, LocalData, TrainEvent
from fedge.edge_functions.runtime import Instance, WarmPool
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


def _instances(data: Path) -> tuple[dict[str, Callable[[int], Instance] | None], str | None]:
    """What each runtime's pools are made of, and why the container side is skipped (None: it is not)."""
    image = os.environ.get("FEDGE_IMAGE", containers.DEFAULT_IMAGE)
    try:
        made = containers.instances(containers.ContainerSettings(image=image, data=(data,)))
    except containers.ContainerError as exc:
        return {"process": None}, str(exc)
    return {"process": None, "container": made}, None


def _spread(values: list[float], scale: float = 1.0) -> dict[str, float]:
    scaled = [v * scale for v in values]
    return {"min": min(scaled), "median": statistics.median(scaled), "max": max(scaled)}


def run(quick: bool) -> dict:
    repeats = 1 if quick else 5
    with tempfile.TemporaryDirectory(prefix="fedge-bench-") as tmp:
        work = Path(tmp)
        (creds,) = loopback_pki.make(work / "pki", ["device"])
        digits = datasets.load("mnist")
        x, y = digits.x_train[:EXAMPLES], digits.y_train[:EXAMPLES]
        (work / "data").mkdir()
        np.savez(work / "data" / "data.npz", x=x, y=y)
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
            data=LocalData(path=work / "data" / "data.npz"),
            outbox=work / "outbox",  # keep the update: every repeat trains the same round
            model_sha256=model.sha256,  # as the agent passes it on from the round's announcement
        )
        instances, skipped = _instances(work / "data")
        names = list(instances)
        kinds = ("cold", "cold_wall", "warm_wall", "warm_function")
        samples: dict[str, dict[str, list[float]]] = {name: {k: [] for k in kinds} for name in names}
        baseline: list[float] = []
        fits: list[float] = []
        try:
            bare_fit = _BareFit(x, y, model.body)
            for repeat in range(repeats):
                baseline.append(_import_torch())
                order = names if repeat % 2 == 0 else names[::-1]
                pools = {name: WarmPool(1, instances=instances[name]) for name in order}
                try:
                    for name in order:
                        started = time.perf_counter()
                        first = pools[name].invoke("train", event).result()
                        samples[name]["cold_wall"].append(time.perf_counter() - started)
                        samples[name]["cold"].append(first.startup_seconds)
                    for _ in range(WARM_PER_WORKER):
                        for name in order:
                            started = time.perf_counter()
                            warm = pools[name].invoke("train", event).result()
                            samples[name]["warm_wall"].append(time.perf_counter() - started)
                            samples[name]["warm_function"].append(warm.seconds)
                        fits.append(bare_fit())
                finally:
                    for pool in pools.values():
                        pool.close()
        finally:
            server.stop()
    import_torch = statistics.median(baseline)
    result: dict = {
        "repeats": repeats,
        "examples": EXAMPLES,
        "import_torch_s": _spread(baseline),
        "bare_fit_s": _spread(fits),
    }
    for name, got in samples.items():
        result[name] = {
            "cold_startup_s": _spread(got["cold"]),
            "cold_ratio": statistics.median(got["cold"]) / import_torch,
            "cold_invocation_s": _spread(got["cold_wall"]),
            "warm_invocation_s": _spread(got["warm_wall"]),
            "warm_overhead_ms": _spread([w - f for w, f in zip(got["warm_wall"], fits, strict=True)], 1000),
            "dispatch_overhead_ms": _spread(
                [w - f for w, f in zip(got["warm_wall"], got["warm_function"], strict=True)], 1000
            ),
        }
    if skipped is None:
        process, container = result["process"], result["container"]
        result["container_warm_ratio"] = (
            container["warm_overhead_ms"]["median"] / process["warm_overhead_ms"]["median"]
        )
    else:
        result["container"] = {"skipped": skipped}
    return result


def _cell(spread: dict[str, float], unit: str, digits: int = 2, scale: float = 1.0) -> str:
    """median (min-max), as the interleaved samples spread."""
    low, mid, high = (spread[k] * scale for k in ("min", "median", "max"))
    return f"{mid:.{digits}f} {unit} ({low:.{digits}f}-{high:.{digits}f})"


def render(result: dict) -> str:
    if "process" not in result:  # a result of this benchmark from before both runtimes were measured
        return "Measured before the container runtime: rerun `python -m bench cold-start`.\n"
    process, container = result["process"], result["container"]
    skipped = container.get("skipped")

    def row(measure: str, cell: Callable[[dict], str], goal: str = "") -> str:
        theirs = "skipped" if skipped else cell(container)
        return f"| {measure} | {cell(process)} | {theirs} | {goal} |\n"

    def both(measure: str, cell: str) -> str:
        return f"| {measure} | {cell} | {cell} | baseline |\n"

    table = (
        "| measure | worker process | container | goal |\n|---|---|---|---|\n"
        + both("bare `import torch` (fresh interpreter)", _cell(result["import_torch_s"], "s"))
        + row("cold start-up of an instance", lambda r: _cell(r["cold_startup_s"], "s"))
        + row("cold start-up / `import torch`", lambda r: f"**{r['cold_ratio']:.2f}x**",
              "worker at most 1.2x, container 1.3x")
        + row("cold `train` invocation, all in", lambda r: _cell(r["cold_invocation_s"], "s"))
        + row("warm `train` invocation", lambda r: _cell(r["warm_invocation_s"], "ms", 0, 1000))
        + both("the training itself (same `fit`)", _cell(result["bare_fit_s"], "ms", 0, 1000))
        + row("warm overhead over the training", lambda r: f"**{_cell(r['warm_overhead_ms'], 'ms', 1)}**",
              "worker under 20 ms")
        + row("of which the pool's dispatch (pipe or socket, thread)",
              lambda r: _cell(r["dispatch_overhead_ms"], "ms", 1))
    )  # fmt: skip
    if skipped:
        verdict = f"Container side skipped: {skipped}"
    else:
        ratio = result["container_warm_ratio"]
        verdict = f"Container warm overhead / worker's: **{ratio:.2f}x** (goal under 1.5x)."
    return (
        f"{table}\n{verdict}\n\nMedians (min-max) of {result['repeats']} cold and "
        f"{WARM_PER_WORKER * result['repeats']} warm invocations per runtime, interleaved; "
        f"{result['examples']} MNIST digits, one local epoch. The dispatch is an invocation's wall time "
        "less the function's own, timed inside the instance.\n"
    )
