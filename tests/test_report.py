"""Benchmark tables: a rerun refreshes the generated part and keeps the hand-written reading."""

from __future__ import annotations

from lmkit.report import HAND_WRITTEN, write_table


def test_a_rerun_keeps_what_was_written_by_hand_under_the_marker(tmp_path):
    table = tmp_path / "bench.md"
    write_table(table, "# Bench\n\n| a |\n|---|\n| 1 |\n")
    assert table.read_text().endswith(HAND_WRITTEN + "\n")  # a new table offers the marker
    table.write_text(table.read_text() + "\n## Reading\n\nThe method loses here, because ...\n")
    write_table(table, "# Bench\n\n| a |\n|---|\n| 2 |\n")
    text = table.read_text()
    assert "| 2 |" in text and "| 1 |" not in text  # the numbers are the rerun's
    assert text.endswith(HAND_WRITTEN + "\n\n## Reading\n\nThe method loses here, because ...\n")
    assert text.count(HAND_WRITTEN) == 1
