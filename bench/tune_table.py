"""The launch-geometry candidates of one bench/device_check.sh run beside the defaults, as one
table: for every guard row of a tuned backend (gate, stats_freq, options), the default
geometry's time (the full bench of the first layout) and each candidate's (tune-N/), each
with x floor and the ratio to torch fused AdamW timed in the same process. Processes of one
run differ by ~1%, so the ratio to the same-process fused baseline is what compares them.

    python bench/tune_table.py DEVICE_CHECK_FOLDER        # a Markdown table on stdout

Where torch fused AdamW failed or is missing in a process, that process's ratios are "-". A
tune.txt or bench JSON that cannot be read stops the script with exit status 1, naming the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional


def _table(report_path: Path) -> dict:
    """The report's first table; ValueError naming the file where it is not readable as one."""
    try:
        return json.loads(report_path.read_text())["tables"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
        raise ValueError(f"{report_path}: not a readable bench report ({type(err).__name__}: {err})") from err


def _fused_ms(table: dict) -> Optional[float]:
    """torch fused AdamW's ms in ``table``; None where the row is missing or failed (its ms None)."""
    return next((r.get("ms") for r in table["rows"] if r["name"] == "torch AdamW fused"), None)


def candidates(folder: Path) -> list:
    """(label, backend, table) for the default and every tune entry listed in tune.txt."""
    entries = []
    listing = folder / "tune.txt"
    for number, line in enumerate(listing.read_text().splitlines(), 1):
        try:
            name, backend, setting = line.split(maxsplit=2)
            # A geometry by its fields; another switch (LBW_EARLY_TELEMETRY=0) as set
            variable, value = setting.split("=", 1)
        except ValueError:
            raise ValueError(
                f"{listing}: line {number}: expected 'tune_N BACKEND VARIABLE=VALUE', got {line!r}") from None
        report = folder / name.replace("tune_", "tune-") / "bench.json"
        label = value if variable == f"LBW_{backend.upper()}_GEOMETRY" else setting
        if report.exists():
            entries.append((label, backend, _table(report)))
        else:
            entries.append((label + " (no result)", backend, None))
    if not entries:
        return []
    layout = next((t["layout"] for _, _, t in entries if t is not None), None)
    default = folder / f"bench-{layout}" / "bench.json"
    defaults = [("default", b, _table(default)) for b in dict.fromkeys(b for _, b, _ in entries)] if default.exists() else []
    return defaults + entries


def render(entries: list) -> str:
    lines = ["| backend | row | setting | ms | x floor | vs fused (same process) |", "|---|---|---|---|---|---|"]
    for backend in dict.fromkeys(b for _, b, _ in entries):
        mine = [(label, t) for label, b, t in entries if b == backend]
        names = [r["name"] for _, t in mine if t is not None for r in t["rows"] if r["backend"] == backend]
        for name in dict.fromkeys(names):
            for label, table in mine:
                if table is None:
                    lines.append(f"| {backend} | {name} | {label} | - | - | - |")
                    continue
                row = next((r for r in table["rows"] if r["name"] == name), None)
                if row is None or row.get("error"):
                    continue
                fused = _fused_ms(table)
                ratio = f"{row['ms'] / fused:.3f}" if fused else "-"  # (no baseline in that process)
                lines.append(f"| {backend} | {name} | {label} | {row['ms']:.3f} | {row['x_floor']:.3f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    args = ap.parse_args()
    try:
        entries = candidates(args.folder)
    except (OSError, ValueError) as err:
        sys.exit(f"tune_table.py: {err}")
    if not entries:
        sys.exit(f"no tune entries in {args.folder / 'tune.txt'}")
    print(render(entries))


if __name__ == "__main__":
    main()
