"""How the accuracy benchmarks report: on stdout one JSON line per row with exactly the fields their issue
names; anything more a row knows (per-seed values, the target it was run for) and the figure's path on stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

Record = dict[str, Any]


def emit(record: Record, fields: Sequence[str]) -> None:
    """Print ``record``'s named ``fields`` as a JSON line on stdout, and the rest of it on stderr."""
    print(json.dumps({k: record[k] for k in fields}), flush=True)
    rest = {k: v for k, v in record.items() if k not in fields}
    if rest:
        print(json.dumps(rest), file=sys.stderr, flush=True)


def finish(records: list[Record], figure: str | None, plot: Callable[[list[Record], str], None]) -> list[Record]:
    """Draw the figure when one is asked for (saying where on stderr); the records, for a caller."""
    if figure:
        plot(records, figure)
        print(f"figure: {figure}", file=sys.stderr, flush=True)
    return records
