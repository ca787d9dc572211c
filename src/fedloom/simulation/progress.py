"""A rich progress bar for rounds, showing the latest loss, accuracy and elapsed time."""

from __future__ import annotations

import math

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class RoundProgress:
    """Context manager: ``advance(row)`` moves the bar one round and shows that round's metrics."""

    def __init__(self, rounds: int, name: str, enabled: bool = True):
        self.enabled = enabled
        self.accuracy = math.nan
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), disable=not enabled,
        )
        self.task = self.progress.add_task(name, total=rounds, status="")

    def __enter__(self) -> RoundProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def advance(self, row: dict[str, float]) -> None:
        if not math.isnan(row.get("test_accuracy", math.nan)):
            self.accuracy = row["test_accuracy"]
        status = f"loss {row['train_loss']:.3f}  acc {self.accuracy:.3f}"
        epsilon = next((v for k, v in row.items() if k.endswith(".epsilon")), None)
        if epsilon is not None:
            status += f"  ε {epsilon:.2f}"
        self.progress.update(self.task, advance=1, status=status)
