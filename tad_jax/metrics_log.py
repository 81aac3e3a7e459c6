"""The training log: `WORKDIR/metrics.jsonl` (one JSON object per logged step) and TensorBoard.

Public API: `MetricsWriter(workdir, resume_step=..., tensorboard=True)`, `read_metrics(workdir)`.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax

logger = logging.getLogger(__name__)


class MetricsWriter:
    """`WORKDIR/metrics.jsonl` (one JSON object per logged step) and TensorBoard scalars."""

    def __init__(self, workdir: str, *, resume_step: int, tensorboard: bool = True):
        """Opens the files; lines of steps after `resume_step` (a killed run's) are dropped."""
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._file = self._tb = None
        if jax.process_index() != 0:
            return  # one writer per run, even when the workdir is shared by several hosts
        kept = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if _step_of(line) <= resume_step]
        with open(self.path, "w") as f:
            f.writelines(kept)
        self._file = open(self.path, "a")  # noqa: SIM115 - held open for the whole run
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, record: dict[str, float]) -> None:
        """Appends one record (and its scalars to TensorBoard)."""
        if self._file is None:
            return
        self._file.write(json.dumps({"step": step, **record}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        """Flushes and closes both outputs."""
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a torn line (a process killed mid-write)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The records of `WORKDIR/metrics.jsonl`, in order; a torn line (a process killed
    mid-write; a resumed run drops it) is skipped with a warning.

    Raises:
      FileNotFoundError: no metrics.jsonl in `workdir`.
    """
    records = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s/metrics.jsonl line %d is torn (a killed run); skipped",
                               workdir, number)
    return records
