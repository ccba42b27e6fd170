"""Progress bars that also report into a log file: rich's live bar on a terminal, plain lines elsewhere.

rich draws nothing until the end when stderr is not a terminal (``pixart prepare … 2> log``, a batch job, CI), so
a long job would look hung. There :class:`Bar` prints one plain line per task every ``interval`` seconds instead.
"""

from __future__ import annotations

import math
import time
from typing import Any

from rich.progress import Progress, TaskID

from pixart_cli.cli.common import console


def _clock(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-:--:--"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Bar(Progress):
    """A rich ``Progress`` on the commands' stderr console that also prints periodic lines off a terminal."""

    def __init__(self, *columns: Any, interval: float = 30.0, **kwargs: Any) -> None:
        kwargs.setdefault("console", console)
        super().__init__(*columns, **kwargs)
        self.plain = not self.console.is_terminal and not self.disable
        self.interval = interval
        self._printed: dict[TaskID, float] = {}
        self._finished: set[TaskID] = set()

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._report(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._report(task_id)

    def _report(self, task_id: TaskID) -> None:
        if not self.plain:
            return
        now = time.monotonic()
        task = self._tasks[task_id]
        finished = task.total is not None and task.completed >= task.total
        if task_id in self._finished or (not finished and now - self._printed.get(task_id, -math.inf) < self.interval):
            return
        self._printed[task_id] = now
        if finished:
            self._finished.add(task_id)
        done = f"{task.completed:g}/{task.total:g}" if task.total else f"{task.completed:g}"
        percent = f" ({task.percentage:.0f}%)" if task.total else ""
        info = task.fields.get("info", "")
        line = f"{task.description} {done}{percent}  elapsed {_clock(task.elapsed)}"
        line += "" if finished else f"  ETA {_clock(task.time_remaining)}"
        self.console.print(line + (f"  {info}" if info else ""), markup=False, highlight=False, soft_wrap=True)
