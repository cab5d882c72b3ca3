"""The issues' performance targets, read off bench JSON: each target's rows with their measured
ratio and whether it is met, for the steps timed alone (``ms``) and, on CUDA, back to back
(``ms_loop``). What a GPU session quotes in its note, without reading ratios off a table by
eye.

    python bench/targets.py bench/results/nvidia-h200-*-20261127.json     # Markdown on stdout
    python bench/targets.py DEVICE_CHECK_FOLDER/bench-*/bench.json

Targets (issue 3, Triton; issue 4, C++/CUDA: "the Triton issue's targets, cuda and triton side
by side"), on CUDA for every kernel backend in the file:
  - TinyLlama-1.1B, exact gate, telemetry every call: <= 1.05x the 32 B floor, and faster than
    torch fused AdamW (which runs no guard);
  - TinyLlama-1.1B, single_pass gate: <= 1.05x the 28 B floor;
  - 2000 x 65,536: >= 4x faster than torch fused AdamW (both gates, telemetry every call).
On CPU (issue 4, backend cpp, GPT-2 124M or its 30M scaling): exact gate <= 1.15x torch fused AdamW,
single_pass <= 1.0x, exact with stats_freq=10 <= 1.02x, and each gate >= 4x faster than the
published procedure with telemetry every call.

Rows captured in a CUDA graph (``bench --graphs add|only``: the row's name plus " (CUDA graph)")
are judged in a third column, "captured", against torch fused AdamW captured the same way.

A ratio is the bench's own (x floor: the row's time over its bytes at the copy bandwidth
measured in the same run; vs fused: over torch fused AdamW's time in the same run), so rows
of files from different devices are never compared with each other.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

KERNEL_BACKENDS = ("cuda", "triton")
GRAPH_SUFFIX = " (CUDA graph)"  # lbw_kernels.bench.GRAPH_SUFFIX (this script reads JSON alone, no torch)
CPU_LAYOUTS = ("gpt2-124m", "gpt2-30m")  # issue 4: "GPT-2 124M shapes (or scaled to about 30M)"


@dataclass(frozen=True)
class Target:
    """One target on one row: ``value(row, table, loop)`` the row's ratio (None where the run
    has no such number), met when ``<= limit`` (or ``>= limit`` with ``at_least``)."""

    text: str
    row: str
    value: Callable[[dict, dict, bool], Optional[float]]
    limit: float
    at_least: bool = False
    unit: str = "x"

    def met(self, value: float) -> bool:
        return value >= self.limit if self.at_least else value <= self.limit


def _field(name: str) -> Callable[[dict, dict, bool], Optional[float]]:
    """The row's ``name`` (``x_floor`` / ``vs_fused``), or its ``_loop`` twin."""
    return lambda row, table, loop: row.get(f"{name}_loop" if loop else name)


def _faster_than(baseline: str) -> Callable[[dict, dict, bool], Optional[float]]:
    """How many times faster than the ``baseline`` row of the same table (a captured row: than
    the baseline's captured twin)."""

    def value(row: dict, table: dict, loop: bool) -> Optional[float]:
        key = "ms_loop" if loop else "ms"
        name = baseline + (GRAPH_SUFFIX if row.get("graph") else "")
        base = next((r for r in table["rows"] if r["name"] == name), None)
        if base is None or base.get(key) is None or row.get(key) is None:
            return None
        return base[key] / row[key]

    return value


def targets_for(device: str, layout: str, backends: List[str]) -> List[Target]:
    """The targets a table of ``layout`` on ``device`` answers, for the backends it timed."""
    out: List[Target] = []
    if device == "cuda" and layout == "tinyllama-1.1b":
        for b in (b for b in KERNEL_BACKENDS if b in backends):
            out += [
                Target("exact <= 1.05x floor (32 B)", f"guard {b} exact sf=1", _field("x_floor"), 1.05),
                Target("exact faster than torch fused", f"guard {b} exact sf=1", _field("vs_fused"), 1.0,
                       unit="x fused"),
                Target("single_pass <= 1.05x floor (28 B)", f"guard {b} single_pass sf=1", _field("x_floor"), 1.05),
            ]
    elif device == "cuda" and layout == "2000x65536":
        for b in (b for b in KERNEL_BACKENDS if b in backends):
            for gate in ("exact", "single_pass"):
                out.append(Target(f"{gate} >= 4x faster than torch fused", f"guard {b} {gate} sf=1",
                                  _faster_than("torch AdamW fused"), 4.0, at_least=True, unit="x faster"))
    elif device == "cpu" and layout in CPU_LAYOUTS and "cpp" in backends:
        out += [
            Target("exact <= 1.15x torch fused", "guard cpp exact sf=1", _field("vs_fused"), 1.15, unit="x fused"),
            Target("single_pass <= 1.0x torch fused", "guard cpp single_pass sf=1", _field("vs_fused"), 1.0,
                   unit="x fused"),
            Target("exact sf=10 <= 1.02x torch fused", "guard cpp exact sf=10", _field("vs_fused"), 1.02,
                   unit="x fused"),
        ]
        for gate in ("exact", "single_pass"):
            out.append(Target(f"{gate} >= 4x faster than published sf=1", f"guard cpp {gate} sf=1",
                              _faster_than("published sf=1"), 4.0, at_least=True, unit="x faster"))
    return out


def _cell(target: Target, row: Optional[dict], table: dict, loop: bool) -> str:
    if row is None:
        return "not run | "
    if row.get("error"):
        return "failed | "
    value = target.value(row, table, loop)
    if value is None:
        return "- | "
    return f"{value:.3f} {target.unit} | {'yes' if target.met(value) else '**no**'}"


def report(path: Path) -> List[str]:
    """Markdown lines for one bench JSON: a heading naming device, commit and date, then one
    table per layout that has targets (none: a line saying so)."""
    rep = json.loads(path.read_text())
    if not isinstance(rep, dict) or "environment" not in rep or "tables" not in rep:
        return [f"### {path.name}: not a bench report (lbw-kernels bench --out writes those)", ""]
    env = rep["environment"]
    device = env.get("device", "?")
    commit = (env.get("git_commit") or "unknown")[:10]
    lines = [f"### {path.name}: {env.get('device_name', device)}, commit {commit}, {env.get('date', '?')[:10]}", ""]
    backends = list(rep.get("backends") or [])
    tables = 0
    for table in rep["tables"]:
        targets = targets_for(device, table["layout"], backends)
        if not targets:
            continue
        tables += 1
        rows = {r["name"]: r for r in table["rows"]}
        captured = any(r.get("graph") for r in table["rows"])
        # (a table of captured rows alone, bench --graphs only, gets the captured column alone)
        eager = not captured or any(t.row in rows for t in targets)
        loop = eager and any(r.get("ms_loop") is not None and not r.get("graph") for r in table["rows"])
        # columns: (title, how the row is found and timed)
        columns = ([("alone", "", False)] if eager else []) + ([("loop", "", True)] if loop else []) + (
            [("captured", GRAPH_SUFFIX, False)] if captured else [])
        lines.append(f"{table['layout']}:")
        lines.append("")
        head = "| target | row |" + "".join(f" {title} | met |" for title, _, _ in columns)
        lines += [head, "|" + "---|" * head.count(" |")]
        met = [0] * len(columns)
        for t in targets:
            line = f"| {t.text} | {t.row} |"
            for i, (_, suffix, on_loop) in enumerate(columns):
                cell = _cell(t, rows.get(t.row + suffix), table, on_loop)
                line += f" {cell} |"
                met[i] += cell.endswith("yes")
            lines.append(line)
        lines.append("")
        words = {"alone": "timed alone", "loop": "back to back", "captured": "captured in a CUDA graph"}
        lines.append("met: " + ", ".join(f"{n} of {len(targets)} {words[title]}"
                                         for n, (title, _, _) in zip(met, columns)))
        lines.append("")
    if not tables:
        lines += [f"(no targets for device {device!r}, layouts "
                  f"{', '.join(t['layout'] for t in rep['tables'])}, backends {', '.join(backends) or 'none'})", ""]
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", type=Path, help="bench.json files (lbw-kernels bench --out)")
    args = ap.parse_args(argv)
    for path in args.reports:
        print("\n".join(report(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
