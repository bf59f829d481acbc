"""Simulations on a Ray cluster: ``fedge simulate --backend ray`` on a real two-node Ray cluster on
loopback (a head and a second node started with ``ray start``, one CPU each, as on two machines) against
the local pool of warm workers (``--backend local``), the same federation with two clients training at a
time on each side: two warm workers, or two Ray actors, one per node. The server is the same mutual-TLS
process on both sides.

Two workloads: training (LeNet on a Dirichlet(0.5) split of MNIST, one local epoch) and no-op rounds (the
model is sent back untrained: the backend's own cost per client). The two backends alternate in pairs
(which goes first alternates too), so drift in the machine's load hits both alike; a round's time is the
interval between the ends of two consecutive rounds' evaluations, the first round (start-up: Ray's actors
import torch) reported apart. Each figure is min / median / max over the pairs, the ratio per pair.

On one machine of 2 cores, both "nodes" share the same cores, so this shows what the Ray backend costs
(task dispatch, object transfer, actors' own processes), not what a second machine would add.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BACKENDS = ("local", "ray")
FULL = {
    "pairs": 3,
    "workloads": {
        "train": {"dataset": "mnist", "clients": 10, "rounds": 6, "epochs": 1},
        "noop": {"dataset": "mnist", "clients": 50, "rounds": 5, "epochs": 0},
    },
}
QUICK = {"pairs": 1, "workloads": {"noop": {"dataset": "digits", "clients": 4, "rounds": 2, "epochs": 0}}}


def run(quick: bool) -> dict:
    from tests.loopback import ray_cluster

    size = QUICK if quick else FULL
    runs: dict[str, dict[str, list[dict]]] = {w: {b: [] for b in BACKENDS} for w in size["workloads"]}
    with ray_cluster(nodes=2) as address:
        for pair in range(size["pairs"]):
            for name, workload in size["workloads"].items():
                for backend in BACKENDS if pair % 2 == 0 else BACKENDS[::-1]:
                    done = _simulate(backend, address, workload)
                    runs[name][backend].append(done)
                    print(f"pair {pair + 1}, {name}, {backend}: {done['seconds_per_round']:.3f} s/round",
                          file=sys.stderr, flush=True)  # fmt: skip
    return {
        "pairs": size["pairs"],
        "workloads": {
            name: {
                **size["workloads"][name],
                **{
                    f"{backend}_{key}": _spread([r[key] for r in by[backend]])
                    for backend in BACKENDS
                    for key in ("seconds_per_round", "first_round_seconds")
                },
                "nodes": by["ray"][-1]["nodes"],
                "ratio": _spread(
                    [
                        ray["seconds_per_round"] / local["seconds_per_round"]
                        for local, ray in zip(by["local"], by["ray"], strict=True)
                    ]
                ),
            }
            for name, by in runs.items()
        },
    }


def _simulate(backend: str, address: str, workload: dict) -> dict:
    """One ``fedge simulate`` with ``backend``, in a directory of its own: Ray puts the driver's working
    directory on its workers' path, and a source tree there would shadow the installed package."""
    with tempfile.TemporaryDirectory(prefix=f"bench-ray-{backend}-") as tmp:
        out = Path(tmp) / "run"
        command = [
            sys.executable, "-m", "fedge", "simulate", "--backend", backend, "--workers", "2",
            "--clients", str(workload["clients"]), "--rounds", str(workload["rounds"]),
            "--local-epochs", str(workload["epochs"]), "--dataset", workload["dataset"],
            "--partition", "dirichlet:0.5", "--out", str(out),
            *(["--ray-address", address] if backend == "ray" else []),
        ]  # fmt: skip
        env = {**os.environ, "FEDGE_CONFIG": os.devnull}
        env.pop("PYTHONPATH", None)
        started = time.time()
        done = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"{backend} run failed: {done.stderr[-2000:]}")
        metrics = json.loads((out / "metrics.json").read_text())
    ends = [started] + [r["ended"] for r in metrics["rounds"]]
    durations = [b - a for a, b in itertools.pairwise(ends)]
    return {
        "seconds_per_round": statistics.median(durations[1:]) if len(durations) > 1 else durations[0],
        "first_round_seconds": durations[0],
        "nodes": len(metrics.get("nodes") or {}),
    }


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def render(result: dict) -> str:
    def cell(spread: dict, digits: int = 2) -> str:
        return " / ".join(f"{spread[k]:.{digits}f}" for k in ("min", "median", "max"))

    lines = [
        "`fedge simulate --backend ray` on a two-node Ray cluster on loopback (one CPU per node, one actor",
        "on each) against the local pool (two warm workers), the same federation and mutual-TLS server on",
        f"both sides, in {result['pairs']} interleaved pairs; min / median / max over the pairs, the ratio",
        "per pair.",
        "",
        "| workload | clients | rounds | local s/round | Ray s/round | Ray / local | first round local | "
        "first round Ray | nodes that ran clients |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, w in result["workloads"].items():
        label = f"{name} ({w['dataset']}, {w['epochs']} local epoch{'s' if w['epochs'] != 1 else ''})"
        lines.append(
            f"| {label} | {w['clients']} | {w['rounds']} | {cell(w['local_seconds_per_round'])} "
            f"| {cell(w['ray_seconds_per_round'])} | **{cell(w['ratio'])}x** "
            f"| {cell(w['local_first_round_seconds'], 1)} | {cell(w['ray_first_round_seconds'], 1)} "
            f"| {w['nodes']} |"
        )
    lines += [
        "",
        "Both nodes share this machine's 2 cores: the ratio is the Ray backend's own cost (dispatch, object",
        "transfer, the actors' processes), not the speed-up a second machine would bring.",
    ]
    return "\n".join(lines)
