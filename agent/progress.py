"""One progress bar for every long loop (training steps, evaluation tasks, rollout episodes)."""

from __future__ import annotations

from typing import Any


class ProgressBar:
    """A rich progress bar: ``label``, bar, done/total ``unit``, the formatted ``fields``, times.

    ``fields`` maps a field name to its format spec (``{"reward": ".3f"}``); :meth:`update`
    sets ``completed`` and any of those fields. Disabled (``enabled=False``, e.g. on ranks > 0
    or in tests), it does nothing, so callers never branch on it.
    """

    def __init__(
        self,
        label: str,
        total: int,
        *,
        completed: int = 0,
        unit: str = "",
        fields: dict[str, str] | None = None,
        enabled: bool = True,
        transient: bool = False,
    ) -> None:
        self.label, self.total, self.completed, self.unit = label, total, completed, unit
        self.fields = dict(fields or {})
        self.enabled, self.transient = enabled, transient
        self._progress = None
        self._task = None

    def __enter__(self) -> ProgressBar:
        if not self.enabled:
            return self
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns: list[Any] = [TextColumn(self.label), BarColumn(), MofNCompleteColumn()]
        if self.unit:
            columns.append(TextColumn(self.unit))
        columns += [
            TextColumn(f"{name} {{task.fields[{name}]:{spec}}}")
            for name, spec in self.fields.items()
        ]
        columns += [TimeElapsedColumn(), TimeRemainingColumn()]
        self._progress = Progress(*columns, transient=self.transient)
        self._progress.start()
        initial = {name: float("nan") for name in self.fields}
        self._task = self._progress.add_task(
            self.label, total=self.total, completed=self.completed, **initial
        )
        return self

    def update(self, completed: int, **fields: float) -> None:
        if self._progress is None:
            return
        unknown = set(fields) - set(self.fields)
        if unknown:
            raise KeyError(f"progress bar {self.label!r} has no field(s) {sorted(unknown)}")
        self._progress.update(self._task, completed=min(completed, self.total), **fields)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
