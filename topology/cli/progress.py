"""A load run's live progress bar (`kiosk_emu.load.run.LoadProgress`), drawn with rich on stderr's terminal."""

from __future__ import annotations

from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn


class RichProgress:
    """One transient bar per run: seconds elapsed of warm-up plus duration, and requests done."""

    def __init__(self) -> None:
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def start(self, label: str, total_s: float) -> None:
        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[done]} done"),
            TimeRemainingColumn(),
            transient=True,
        )
        self._bar.start()
        self._task = self._bar.add_task(label, total=total_s, done=0)

    def update(self, elapsed_s: float, done: int) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=elapsed_s, done=done)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def say(line: str) -> None:
    """One step of a long bench, as it happens."""
    print(line, flush=True)
