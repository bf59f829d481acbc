"""The agent's per-round placement: capacity probe, predictor and policy together, each decision logged
with the predicted seconds per component and, once the round ran, the actual ones."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from fedge.client.policy import EDGE, Cost, OffloadSetting, Placement, Situation, on_device, place
from fedge.client.predictor import Prediction, Predictor, Run
from fedge.pricing import EXAMPLE_PRICES, GB, Prices
from fedge.wire import RoundInfo, TrainConfig

log = logging.getLogger("fedge.placement")

AVOID_ROUNDS = 2  # decisions an executor that just failed sits out: long enough for a restart, not forever


@dataclass(frozen=True)
class ExecutorTarget:
    """A cloud executor the owner allows: ``--executor ID=URL``; the price table ranks them."""

    id: str
    url: str

    @classmethod
    def parse(cls, text: str) -> ExecutorTarget:
        id_, sep, url = text.partition("=")
        if not sep or not id_ or not url.startswith("https://"):
            raise ValueError(f"--executor takes ID=https://HOST:PORT, not {text!r}")
        return cls(id_, url)


class Placer:
    def __init__(
        self,
        setting: OffloadSetting,
        executors: tuple[ExecutorTarget, ...],
        train_memory: int,
        policy: Callable[[Situation], Placement] = place,
        prices: Prices = EXAMPLE_PRICES,
        max_cost: float = math.inf,
    ) -> None:
        self.setting = setting
        self.prices = prices  # what each target's round is predicted to cost (``fedge.pricing``)
        self.max_cost = max_cost  # the owner's budget per round
        self.policy = policy  # fedge's; a simulation may compare a baseline (policy.fastest)
        self.executors = executors
        self.train_memory = train_memory  # bytes a training run needs on the device
        self.predictor = Predictor()
        self.previous: Placement | None = None
        self._predicted: dict[str, Prediction] = {}
        self._model_bytes = 0  # the last model downloaded: the next round's will be as large
        self._update_bytes = 0  # the last update uploaded: the next one will be as large
        self.shard_bytes = 0  # the device's sealed shard: what an offload uploads before the executor starts
        self._avoid: dict[str, int] = {}  # executor id -> decisions it still sits out

    def decide(self, info: RoundInfo, examples: int, now: float, free: int) -> Placement:
        """``free``: bytes of memory the device has now (``capacity.free_memory`` on a device, the profile's
        limit in a simulation)."""
        steps = steps_of(info.config, examples)
        edge = self._cost(EDGE, info.task, steps, free >= self.train_memory)
        candidates = [e for e in self.executors if e.id not in self._avoid]
        self._avoid = {id_: n - 1 for id_, n in self._avoid.items() if n > 1}
        executors = tuple(self._cost(e.id, info.task, steps, True) for e in candidates)
        deadline = info.seconds_left(now)
        situation = Situation(
            self.setting, deadline, steps, edge, executors, previous=self.previous, max_cost=self.max_cost
        )
        self.previous = placement = self.policy(situation)
        predicted = dict(self._predicted)
        log.info(
            "round %d: %s on %s, %d steps, weight %.3f (%s); free memory %d, deadline in %.1f s; "
            "predicted %s",
            info.round, placement.kind, placement.target, placement.steps, placement.weight, placement.reason,
            free, deadline, predicted,
        )  # fmt: skip
        return placement

    def fallback(self, failed: str, info: RoundInfo, examples: int, now: float, free: int) -> Placement:
        """Executor ``failed`` did not train the round: what the device can still do before the deadline.
        The executor sits out the next ``AVOID_ROUNDS`` decisions."""
        self._avoid[failed] = AVOID_ROUNDS
        steps = steps_of(info.config, examples)
        edge = self._cost(EDGE, info.task, steps, free >= self.train_memory)
        deadline = info.seconds_left(now)
        situation = Situation(self.setting, deadline, steps, edge, max_cost=self.max_cost)
        self.previous = placement = on_device(situation)
        log.info(
            "round %d: %s failed, fell back to %s on %s, %d steps, weight %.3f (%s); deadline in %.1f s",
            info.round, failed, placement.kind, placement.target, placement.steps, placement.weight,
            placement.reason, deadline,
        )  # fmt: skip
        return placement

    def calibrated(self, target: str, task: str, small: tuple[int, float], large: tuple[int, float]) -> None:
        self.predictor.calibrate(target, task, small, large)
        log.info("%s calibrated for %s: %d steps in %.3f s, %d steps in %.3f s", target, task, *small, *large)

    def observe(self, target: str, task: str, run: Run) -> None:
        predicted = self._predicted.get(target)
        total = predicted.total_s if predicted is not None else None
        self.predictor.observe(target, task, Run(**{**vars(run), "predicted_s": total}))
        self._model_bytes = run.bytes_down or self._model_bytes
        self._update_bytes = run.bytes_up or self._update_bytes
        log.info("%s ran %d steps: actual %s, predicted %s", target, run.steps, run, predicted)

    def _cost(self, target: str, task: str, steps: int, fits_memory: bool) -> Cost:
        """Predicted from past runs once there are any; before, optimistic, so the first round is tried
        (its price then only what does not depend on time)."""
        price, per_s = self.price(target)
        if not self.predictor.knows(target, task):
            self._predicted.pop(target, None)
            return Cost(target, 0.0, 0.0, price, fits_memory, per_s)
        # Each target moves the model and the update over its own link (timed from its own runs); an
        # executor's job also waits for the device to upload the shard, at the device's uplink until timed.
        shard_bytes, uplink = (
            (0, None) if target == EDGE else (self.shard_bytes, self.predictor.uplink(EDGE, task))
        )
        prediction = self.predictor.predict(
            target, task, steps, self._model_bytes, self._update_bytes, shard_bytes, uplink
        )
        self._predicted[target] = prediction
        return replace(prediction.cost(target, price, fits_memory), price_per_s=per_s)

    def price(self, target: str) -> tuple[float, float]:
        """(per round, per second) at ``self.prices``: an invocation and the model and update moved, then
        the training run's memory (``train_memory``) for each second, and on an executor its GPU."""
        p, gb = self.prices, self.train_memory / GB
        transfer = self._model_bytes / GB * p.gb_down + self._update_bytes / GB * p.gb_up
        if target == EDGE:
            return p.device_invocation + transfer, gb * p.device_gb_second
        return p.executor_invocation + transfer, gb * p.executor_gb_second + p.executor_gpu_second


def steps_of(config: TrainConfig, examples: int) -> int:
    """Local SGD steps a round with ``config`` asks of a client with ``examples`` examples."""
    return max(1, config.local_epochs * math.ceil(examples / config.batch_size))
