"""legacyexample: the quickstart's model, data and loops, shared with the Message-API copy beside it."""

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[2] / "flower_quickstart"))

from pytorchexample.task import Net, load_data, test, train

__all__ = ["Net", "load_data", "test", "train"]
