"""Results as JSON plus a human summary (Markdown file and a rich table on the console)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lmkit.io import is_main_process, write_json_atomic, write_text_atomic


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(
    output_dir: Path,
    title: str,
    results: dict[str, Any],
    headers: list[str],
    rows: list[list[Any]],
    notes: list[str] | None = None,
    final_dir: Path | None = None,
) -> None:
    """`results.json` (everything) and `summary.md` (title, table, notes); prints the table too.

    `final_dir` is where the files end up when `output_dir` is a temp dir swapped in afterwards.
    Only the main process of a multi-process launch writes and prints.
    """
    if not is_main_process():
        return
    write_json_atomic(output_dir / "results.json", results)
    body = [f"# {title}", "", markdown_table(headers, rows), ""] + [f"- {n}" for n in notes or []]
    write_text_atomic(output_dir / "summary.md", "\n".join(body) + "\n")
    table = Table(title=title)
    for header in headers:
        table.add_column(header)
    for row in rows:
        table.add_row(*(str(c) for c in row))
    console = Console()
    console.print(table)
    for note in notes or []:
        console.print(f"- {note}")
    shown = final_dir or output_dir
    console.print(f"Results: {shown / 'results.json'}, summary: {shown / 'summary.md'}")


HAND_WRITTEN = "<!-- written by hand below this line: a rerun of the benchmark keeps it -->"


def write_table(path: Path, generated: str) -> None:
    """Write a benchmark's generated table to `path`, keeping what people wrote under an existing
    file's HAND_WRITTEN line: a rerun refreshes the numbers without deleting their reading."""
    path = Path(path)
    old = path.read_text() if path.is_file() else ""
    kept = old[old.index(HAND_WRITTEN) :] if HAND_WRITTEN in old else HAND_WRITTEN + "\n"
    write_text_atomic(path, generated.rstrip("\n") + "\n\n" + kept)
