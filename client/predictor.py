"""How long a round will take on each target, per component, from what the last runs took.

Compute time is a robust line in the local steps (RANSAC over least squares, so one run slowed by a
neighbour's burst does not tilt it), seeded by a two-size calibration so the first decision has a line at
all. Start-up is the median of a recent window (cold starts are rare but long). Transfers use a low
quantile of measured bandwidth: a pessimistic estimate, since a late update is worth nothing. Each target's
links are its own: the device downloads the model and uploads its update over its uplink; an executor does
both over its own (fast) link, but first the device must upload the sealed shard to it, over the device's
uplink, which can dominate on a slow one. The margin
is a high quantile of the recent relative errors of the whole prediction, so a target that has been
under-predicted gets more slack. Until there are enough errors for a quantile, it is a fixed prior: a line
seeded by calibration alone has never met a real round (its upload, the server, the rest of the device's
work), and in the emulated fleet it under-predicted a round by up to 70%; a late update is worth nothing.
"""

from __future__ import annotations

import warnings
from collections import defaultdict, deque
from dataclasses import dataclass, field

import numpy as np

from fedge.client.policy import Cost

WINDOW = 20
STARTUP_WINDOW = 10
BANDWIDTH_QUANTILE = 0.1
ERROR_QUANTILE = 0.9
MIN_ERRORS = 3  # fewer, and one odd first run (a cold cache, a neighbour's burst) would set the margin
PRIOR_MARGIN = 0.5  # the margin until then: calibration's shortfall against real rounds, with room
MAX_MARGIN = 1.0  # at most double a prediction: more, and a device that would fit gives up its round


@dataclass(frozen=True)
class Run:
    """What one round on a target actually took, per component (seconds, bytes)."""

    steps: int
    compute_s: float
    startup_s: float = 0.0
    bytes_down: int = 0
    download_s: float = 0.0
    bytes_up: int = 0  # the update, uploaded by whoever trained it
    upload_s: float = 0.0
    bytes_shard: int = 0  # an executor's job: the sealed shard the device uploaded to it
    shard_s: float = 0.0
    predicted_s: float | None = None  # the total predicted for this run, for the margin

    @property
    def total_s(self) -> float:
        return self.startup_s + self.shard_s + self.download_s + self.compute_s + self.upload_s


@dataclass(frozen=True)
class Prediction:
    compute_s: float
    startup_s: float
    download_s: float
    upload_s: float
    margin_s: float
    per_step_s: float
    steps: int
    shard_s: float = 0.0

    @property
    def total_s(self) -> float:
        transfers = self.shard_s + self.download_s + self.upload_s
        return self.compute_s + self.startup_s + transfers + self.margin_s

    def cost(self, target: str, price: float = 0.0, fits_memory: bool = True) -> Cost:
        """As ``placement.Cost``: the margin is a fraction of the prediction, so it scales each step as
        well as the fixed part, and a round cut to fewer steps keeps its share of the margin."""
        base = self.total_s - self.margin_s
        factor = self.total_s / base if base > 0 else 1.0
        per_step = self.per_step_s * factor
        return Cost(target, self.total_s - per_step * self.steps, per_step, price, fits_memory)


def robust_line(steps: list[float], seconds: list[float]) -> tuple[float, float]:
    """(intercept, slope) of seconds against steps; RANSAC once there are enough points to outvote one."""
    x = np.asarray(steps, dtype=float)
    y = np.asarray(seconds, dtype=float)
    if len(x) == 0:
        raise ValueError("no runs and no calibration to predict from")
    if len(np.unique(x)) < 2:
        return 0.0, float(np.median(y / np.maximum(x, 1)))
    if len(x) < 4:
        slope, intercept = np.polyfit(x, y, 1)
        return float(intercept), float(slope)
    from sklearn.exceptions import UndefinedMetricWarning
    from sklearn.linear_model import LinearRegression, RANSACRegressor

    mad = float(np.median(np.abs(y - np.median(y)))) or float(np.ptp(y)) or 1.0
    ransac = RANSACRegressor(
        LinearRegression(), min_samples=2, residual_threshold=0.25 * mad + 1e-9, random_state=0
    )
    with warnings.catch_warnings():
        # A trial whose consensus is a single run scores an undefined R^2 and simply loses: not news.
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        ransac.fit(x.reshape(-1, 1), y)
    line = ransac.estimator_
    return float(line.intercept_), float(line.coef_[0])


def low_bandwidth(samples: list[float]) -> float | None:
    """Bytes per second at the low quantile of recent measurements, None before any."""
    return float(np.quantile(samples, BANDWIDTH_QUANTILE)) if samples else None


def error_margin(errors: list[float]) -> float:
    """The fraction to add on top of a prediction: a high quantile of recent under-predictions, once there
    are enough of them to have a quantile, and bounded; the prior before."""
    if len(errors) < MIN_ERRORS:
        return PRIOR_MARGIN
    return min(MAX_MARGIN, max(0.0, float(np.quantile(errors, ERROR_QUANTILE))))


@dataclass
class _History:
    calibration: list[tuple[int, float]] = field(default_factory=list)
    runs: deque[Run] = field(default_factory=lambda: deque(maxlen=WINDOW))


class Predictor:
    """One history per (target, model version); the model version changes what a step costs."""

    def __init__(self) -> None:
        self._history: dict[tuple[str, str], _History] = defaultdict(_History)

    def calibrate(
        self, target: str, version: str, small: tuple[int, float], large: tuple[int, float]
    ) -> None:
        """Seed the compute line with two timed runs of different sizes (steps, seconds)."""
        self._history[(target, version)].calibration = [small, large]

    def observe(self, target: str, version: str, run: Run) -> None:
        self._history[(target, version)].runs.append(run)

    def knows(self, target: str, version: str) -> bool:
        h = self._history.get((target, version))
        return h is not None and bool(h.calibration or h.runs)

    def uplink(self, target: str, version: str) -> float | None:
        """Bytes per second ``target`` uploads its updates at (the low quantile), None before any upload."""
        runs = self._history[(target, version)].runs
        return low_bandwidth([r.bytes_up / r.upload_s for r in runs if r.upload_s > 0 and r.bytes_up])

    def predict(
        self,
        target: str,
        version: str,
        steps: int,
        model_bytes: int,
        update_bytes: int,
        shard_bytes: int = 0,
        uplink: float | None = None,
    ) -> Prediction:
        """``shard_bytes``: what the device uploads to ``target`` before it can start (an executor's sealed
        shard), timed from this target's past shard uploads, else at ``uplink`` (the device's uplink)."""
        h = self._history[(target, version)]
        points = [*h.calibration, *((r.steps, r.compute_s) for r in h.runs)]
        intercept, slope = robust_line([p[0] for p in points], [p[1] for p in points])
        compute = max(0.0, intercept + slope * steps)
        runs = list(h.runs)
        startup = float(np.median([r.startup_s for r in runs[-STARTUP_WINDOW:]])) if runs else 0.0
        down = low_bandwidth([r.bytes_down / r.download_s for r in runs if r.download_s > 0 and r.bytes_down])
        up = low_bandwidth([r.bytes_up / r.upload_s for r in runs if r.upload_s > 0 and r.bytes_up]) or down
        sent = low_bandwidth([r.bytes_shard / r.shard_s for r in runs if r.shard_s > 0 and r.bytes_shard])
        download = model_bytes / down if down else 0.0
        upload = update_bytes / up if up else 0.0
        shard = shard_bytes / (sent or uplink) if (sent or uplink) else 0.0
        errors = [(r.total_s - r.predicted_s) / r.predicted_s for r in runs if r.predicted_s]
        base = compute + startup + shard + download + upload
        margin = error_margin(errors) * base
        return Prediction(compute, startup, download, upload, margin, max(0.0, slope), steps, shard)
