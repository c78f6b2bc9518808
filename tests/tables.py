"""Reading the sweep's table.md back in tests (test_sweep, test_notebooks)."""

from __future__ import annotations


def table_rows(table_md: str, gamma: str) -> dict[str, list[str]]:
    """{row label: cells} of one γ section of table.md; published rows as 'published <m>'."""
    section = table_md.split(f"## γ = {gamma}\n")[1].split("\n## ")[0]
    rows: dict[str, list[str]] = {}
    last = None
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith("| method"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        label = cells[0]
        if label == "*published*":
            label = f"published {last}"
        else:
            last = label
        rows[label] = cells[1:]
    return rows
