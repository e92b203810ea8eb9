"""A run's metrics: ``metrics.jsonl`` (one fsync'd JSON object per step, key ``step``), mirrored
to TensorBoard and, when enabled, W&B; and :func:`read_metrics`, the one reader of that file
(the report, the demo and the entropy study all read it through here)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from agent.io import append_line, atomic_write_text
from trainer.config import RunConfig

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir_or_file: str | os.PathLike[str]) -> list[dict]:
    """The rows of a run's ``metrics.jsonl`` (a run folder or the file itself); [] when absent.

    A last line cut by a kill mid-write is left out (every complete line was fsync'd)."""
    path = Path(run_dir_or_file)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: the write was cut
                break
            raise ValueError(f"{path}: line {number} is not valid JSON") from None
    return rows


class RunLogger:
    """metrics.jsonl (+ TensorBoard, + W&B when enabled) with the design.md metric names."""

    def __init__(
        self, cfg: RunConfig, run_dir: Path, resume_step: int | None, enabled: bool
    ) -> None:
        self.enabled = enabled
        self.path = run_dir / METRICS_FILE
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # steps after the checkpoint are redone: drop their rows, keep the file
            kept = [row for row in read_metrics(self.path) if row.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in kept))
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(
                str(run_dir / "tb"), purge_step=(resume_step + 1) if resume_step else None
            )
        if cfg.logging.wandb:
            import wandb

            self.wandb = wandb.init(
                project=cfg.logging.wandb_project,
                name=run_dir.name,
                config=cfg.model_dump(mode="json"),
                resume="allow",
                id=run_dir.name,
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        append_line(
            self.path, json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}})
        )
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
