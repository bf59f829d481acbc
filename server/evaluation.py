"""Server-side evaluation (``fedge server --eval-data FILE``): the operator's own held-out examples score
every new global model, so a hand-run federation says whether it learns.

The file is checked once at start against the task's model (a file that cannot be read, or does not fit
the model, is one line and no server); then each model a round produces is scored off the round's lock, in
a thread of its own, with the task's own evaluation (``edge_functions.functions.score``). The figures go to
the round log (a line, the accuracy and loss series) and to the store, per round.
"""

from __future__ import annotations

import queue
import threading
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedge.codec import Tensors, decode
from fedge.console import UserError
from fedge.server.roundlog import Event, RoundEvent, RoundLog, evaluated
from fedge.server.store import Evaluation, Store

if TYPE_CHECKING:
    from fedge.edge_functions.tasks import Task

SOURCE = "server"
ZIP_MAGIC = b"PK\x03\x04"  # an .npz is a zip archive of .npy files


class ServerEvaluation:
    def __init__(self, task: Task, x: np.ndarray, y: np.ndarray) -> None:
        self._task, self._x, self._y = task, x, y
        self._queue: queue.Queue[tuple[int, str] | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    @classmethod
    def load(cls, task_name: str, path: Path) -> ServerEvaluation:
        """The task and the file's examples, checked by scoring a fresh model of the task on them; every
        way this can go wrong is a ``UserError`` naming the file."""
        try:
            from fedge.edge_functions import datafiles, tasks
        except ImportError:
            raise UserError(
                "--eval-data needs torch to evaluate the model: pip install 'fedge[all]'"
            ) from None
        try:
            task = tasks.get(task_name)
        except tasks.UnknownTask as exc:
            raise UserError(f"--eval-data: {exc}") from None
        expected = "an .npz with arrays x and y"
        try:
            with path.open("rb") as file:
                if file.read(len(ZIP_MAGIC)) != ZIP_MAGIC:
                    raise UserError(f"--eval-data {path} is not {expected}")
            x, y = datafiles.load(path)  # as an agent reads its --data
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip("'")
            raise UserError(f"cannot read --eval-data {path} ({expected}): {reason}") from None
        if y.ndim != 1 or len(x) != len(y) or len(y) == 0:
            raise UserError(
                f"--eval-data {path}: x and y must hold the same number (> 0) of examples, y one label each;"
                f" got x {list(x.shape)} and y {list(y.shape)}"
            )
        evaluation = cls(task, x, y)
        try:
            evaluation.score(task.initial_tensors(0))
        except (RuntimeError, ValueError, IndexError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(
                f"--eval-data {path} does not fit the model of task {task_name}: {first}"
            ) from None
        return evaluation

    def score(self, tensors: Tensors) -> tuple[float, float]:
        """(loss, accuracy) of a model with these tensors on the file's examples."""
        from fedge.edge_functions import tasks
        from fedge.edge_functions.functions import score

        model = self._task.build_model()
        tasks.load_tensors(model, tensors)
        return score(model, self._x, self._y)

    def start(self, store: Store, log: RoundLog, current_round: int, current_sha256: str) -> None:
        """Score the model in force now (round 0: the initial one), then each new one as its round closes.
        ``store`` is this evaluation's own connection: it writes from its own thread."""
        self._thread = threading.Thread(target=self._run, args=(store, log), name="eval", daemon=True)
        self._thread.start()
        self._queue.put((current_round, current_sha256))
        log.listen(self._on_event)

    def _on_event(self, event: RoundEvent) -> None:
        if event.event is Event.CLOSED:
            self._queue.put((event.round, str(event.fields["model_sha256"])))

    def _run(self, store: Store, log: RoundLog) -> None:
        while (job := self._queue.get()) is not None:
            round_, sha = job
            loss, accuracy = self.score(decode(store.model_path(sha).read_bytes())[0])
            examples = len(self._y)
            store.add_evaluation(Evaluation(round_, SOURCE, loss, accuracy, examples))
            log.emit(evaluated(round_, SOURCE, loss, accuracy, examples, time.time()))
        store.close()

    def close(self) -> None:
        """Finish the models still queued (the last round's, at the end of a federation), then stop."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
