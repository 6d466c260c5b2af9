"""Rows on standard output, as a table (rich), CSV or JSON: what the CLI and the API client print."""

from __future__ import annotations

import csv
import json
import sys
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

__all__ = ["print_rows"]


def print_rows(columns: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str, title: str | None = None,
                width: int | None = None) -> None:
    if fmt == "json":
        json.dump([dict(zip(columns, r)) for r in rows], sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    elif fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(["" if v is None else v for v in r] for r in rows)
    else:
        table = Table(title=title, show_lines=False)
        for c in columns:
            table.add_column(str(c), overflow="fold")
        for r in rows:
            table.add_row(*("" if v is None else str(v) for v in r))
        # on a terminal rich fits the table to it; into a file or pipe, keep rows on one line
        if width is None and not sys.stdout.isatty():
            width = 400
        Console(highlight=False, width=width).print(table)
