"""LEAF's Shakespeare, the naturally non-IID workload FedLess used: one client per (play, role).

Next-character prediction with a small LSTM through ``fedge simulate --dataset shakespeare --partition
natural``, against Flower's simulation on the same clients, model, data and training loop in the same run
(see vs_flower.py). Reports accuracy over rounds, seconds per round and the bytes fedge moved.
"""

from __future__ import annotations

from bench.vs_flower import measure

FULL = {"clients": 20, "rounds": 20, "epochs": 1, "lr": 1.0}
QUICK = {"clients": 3, "rounds": 2, "epochs": 1, "lr": 1.0}


def run(quick: bool) -> dict:
    size = QUICK if quick else FULL
    runs = {
        framework: measure(
            framework,
            size["clients"],
            size["rounds"],
            size["epochs"],
            task="shakespeare",
            partition="natural",
            lr=size["lr"],
        )
        for framework in ("fedge", "flower")
    }
    fedge, flower = runs["fedge"], runs["flower"]
    return {
        "workload": size,
        **runs,
        "ratios": {
            "seconds_per_round": fedge["seconds_per_round"] / flower["seconds_per_round"],
            "accuracy_points": 100 * (fedge["final_accuracy"] - flower["final_accuracy"]),
        },
    }


def render(result: dict) -> str:
    fedge, flower, w = result["fedge"], result["flower"], result["workload"]
    megabytes = sum(fedge["bytes_per_round"]) / 1e6
    lines = [
        f"{w['clients']} clients, each one role of one play (drawn with seed 0), {w['rounds']} rounds, "
        f"{w['epochs']} local epoch, SGD lr {w['lr']}; next character from 40, one-layer LSTM (128 units).",
        "",
        "| | fedge | Flower | fedge / Flower |",
        "|---|---:|---:|---:|",
        f"| seconds per round | {fedge['seconds_per_round']:.2f} | {flower['seconds_per_round']:.2f} "
        f"| {result['ratios']['seconds_per_round']:.2f}x |",
        f"| final accuracy | {fedge['final_accuracy']:.3f} | {flower['final_accuracy']:.3f} "
        f"| {result['ratios']['accuracy_points']:+.1f} points |",
        f"| peak memory (MB) | {fedge['peak_rss_mb']:.0f} | {flower['peak_rss_mb']:.0f} "
        f"| {fedge['peak_rss_mb'] / flower['peak_rss_mb']:.2f}x |",
        "",
        f"fedge moved {megabytes:.1f} MB over mutual TLS in all ({megabytes / w['rounds']:.2f} MB per round: "
        "each update up, and the model down once per warm worker thanks to its ETag); Flower's simulation "
        "passes arrays in memory.",
        "",
        "| round | fedge accuracy | Flower accuracy |",
        "|---:|---:|---:|",
    ]
    for i, (a, b) in enumerate(
        zip(fedge["accuracy_per_round"], flower["accuracy_per_round"], strict=False), 1
    ):
        lines.append(f"| {i} | {a:.3f} | {b:.3f} |")
    return "\n".join(lines)
