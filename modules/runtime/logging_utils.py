"""Rank-aware logging for training: console/file ``logging``, a JSONL metric log, optional TensorBoard.

Only rank 0 writes; other ranks log warnings and errors only, so a failure on any rank is still visible.
The JSONL log (``output_dir/log.jsonl``, one JSON object per line) is the machine-readable record of a run:
step metrics (loss terms, lr, logit scale, samples/s) and per-epoch validation. On resume it is cut back to
the checkpoint's step, so a resumed run's log equals an uninterrupted run's log.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from clip2video.fileio import atomic_write_text

logger = logging.getLogger(__name__)


def setup_logging(log_file: Path | None, is_main: bool = True, level: int = logging.INFO) -> None:
    """Configure the root logger once per process: stdout (+ a file on rank 0)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_file is not None and is_main:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=level if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True)
    # faiss's loader reports each instruction-set build it tries (a failed AVX2 import is normal): not news
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the line parseable
    return v


class MetricLog:
    """Append-only JSONL metric log (+ TensorBoard scalars when ``tensorboard`` is installed).

    Args:
        path: the ``.jsonl`` file, or None on non-main ranks (everything becomes a no-op).
        tensorboard_dir: folder for TensorBoard events, or None.
    """

    def __init__(self, path: Path | None, tensorboard_dir: Path | None = None):
        self.path = path
        self._tb = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        if path is not None and tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(tensorboard_dir))
            except ImportError:  # optional dependency
                logger.info("tensorboard not installed: metrics go to %s only", path)

    def keep_first(self, records: int) -> None:
        """Keep the first ``records`` records: those written before the checkpoint a run resumes from.

        Lines written after it (by the run that was killed) would otherwise appear twice.
        """
        if self.path is None or not self.path.is_file():
            return
        lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()][:records]
        atomic_write_text(self.path, "".join(ln + "\n" for ln in lines))

    def write(self, record: dict[str, Any], prefix: str = "train") -> None:
        """Append one record (must hold ``step``); scalars also go to TensorBoard as ``prefix/key``."""
        if self.path is None:
            return
        rec = {k: _jsonable(v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
        if self._tb is not None:
            step = int(rec.get("step", 0))
            for k, v in rec.items():
                if k != "step" and isinstance(v, int | float):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a JSONL log (tests and plots)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
