"""The issues' performance targets, read off bench JSON: each target's rows with their measured
ratio and whether it is met, for the steps timed alone (``ms``) and, on CUDA, back to back
(``ms_loop``). What a GPU session quotes in its note, without reading ratios off a table by
eye.

    python bench/targets.py bench/results/nvidia-h200-*-20261127.json     # Markdown on stdout
    python bench/targets.py DEVICE_CHECK_FOLDER/bench-*/bench.json

Targets (issue 3, Triton; issue 4, C++/CUDA: "the Triton issue's targets, cuda and triton side
by side"), on CUDA for both kernel backends, whether the file timed them or not (a backend the
run left out, e.g. Triton that failed to import, is "not run" with the reason the file gives,
and counts as not met):
  - TinyLlama-1.1B, exact gate, telemetry every call: <= 1.05x the 32 B floor, and faster than
    torch fused AdamW (which runs no guard; strictly: a tie is not faster);
  - TinyLlama-1.1B, single_pass gate: <= 1.05x the 28 B floor;
  - 2000 x 65,536: >= 4x faster than torch fused AdamW (both gates, telemetry every call).
On CPU (issue 4, backend cpp, timed or not, GPT-2 124M or its 30M scaling): exact gate <= 1.15x
torch fused AdamW, single_pass <= 1.0x, exact with stats_freq=10 <= 1.02x, and each gate >= 4x
faster than the published procedure with telemetry every call.

Rows captured in a CUDA graph (``bench --graphs add|only``: the row's name plus " (CUDA graph)")
are judged in a third column, "captured", against torch fused AdamW captured the same way.

A ratio is the bench's own (x floor: the row's time over its bytes at the copy bandwidth
measured in the same run; vs fused: over torch fused AdamW's time in the same run), so rows
of files from different devices are never compared with each other. A ratio that no timing
can give (NaN, infinite, zero or negative) is "invalid", never met.

The exit status is 1 when a file cannot be read or is not JSON (the other files are still
judged), 2 when none is named.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

KERNEL_BACKENDS = ("cuda", "triton")
# The backends whose targets a device's tables answer, judged whether the run timed them or not.
EXPECTED_BACKENDS = {"cuda": KERNEL_BACKENDS, "cpu": ("cpp",)}
GRAPH_SUFFIX = " (CUDA graph)"  # lbw_kernels.bench.GRAPH_SUFFIX (this script reads JSON alone, no torch)
CPU_LAYOUTS = ("gpt2-124m", "gpt2-30m")  # issue 4: "GPT-2 124M shapes (or scaled to about 30M)"


@dataclass(frozen=True)
class Target:
    """One target on one row of ``backend``: ``value(row, table, loop)`` the row's ratio (None
    where the run has no such number), met when ``<= limit`` (``< limit`` with ``strict``: "faster
    than" is not met at a tie; ``>= limit`` with ``at_least``)."""

    text: str
    row: str
    backend: str
    value: Callable[[dict, dict, bool], Optional[float]]
    limit: float
    at_least: bool = False
    strict: bool = False
    unit: str = "x"

    def met(self, value: float) -> bool:
        if self.at_least:
            return value >= self.limit
        return value < self.limit if self.strict else value <= self.limit


def _valid(value: float) -> bool:
    """A time or ratio a run can give: finite and > 0 (NaN, inf, 0 or below come from a broken
    timing, and would pass a ``<=`` or ``>=`` limit as readily as a good one)."""
    return math.isfinite(value) and value > 0


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
        if not (_valid(base[key]) and _valid(row[key])):
            return math.nan  # (a time of 0 would divide by zero: invalid, not a crash)
        return base[key] / row[key]

    return value


def device_type(device: str) -> str:
    """``"cuda"`` for ``"cuda:0"`` too (bench --device cuda:0 records the index)."""
    return device.split(":", 1)[0]


def targets_for(device: str, layout: str) -> List[Target]:
    """The targets a table of ``layout`` on ``device`` answers, for every backend expected
    there (EXPECTED_BACKENDS), timed or not."""
    out: List[Target] = []
    kind = device_type(device)
    if kind == "cuda" and layout == "tinyllama-1.1b":
        for b in KERNEL_BACKENDS:
            out += [
                Target("exact <= 1.05x floor (32 B)", f"guard {b} exact sf=1", b, _field("x_floor"), 1.05),
                Target("exact faster than torch fused", f"guard {b} exact sf=1", b, _field("vs_fused"), 1.0,
                       strict=True, unit="x fused"),
                Target("single_pass <= 1.05x floor (28 B)", f"guard {b} single_pass sf=1", b, _field("x_floor"),
                       1.05),
            ]
    elif kind == "cuda" and layout == "2000x65536":
        for b in KERNEL_BACKENDS:
            for gate in ("exact", "single_pass"):
                out.append(Target(f"{gate} >= 4x faster than torch fused", f"guard {b} {gate} sf=1", b,
                                  _faster_than("torch AdamW fused"), 4.0, at_least=True, unit="x faster"))
    elif kind == "cpu" and layout in CPU_LAYOUTS:
        out += [
            Target("exact <= 1.15x torch fused", "guard cpp exact sf=1", "cpp", _field("vs_fused"), 1.15,
                   unit="x fused"),
            Target("single_pass <= 1.0x torch fused", "guard cpp single_pass sf=1", "cpp", _field("vs_fused"), 1.0,
                   unit="x fused"),
            Target("exact sf=10 <= 1.02x torch fused", "guard cpp exact sf=10", "cpp", _field("vs_fused"), 1.02,
                   unit="x fused"),
        ]
        for gate in ("exact", "single_pass"):
            out.append(Target(f"{gate} >= 4x faster than published sf=1", f"guard cpp {gate} sf=1", "cpp",
                              _faster_than("published sf=1"), 4.0, at_least=True, unit="x faster"))
    return out


def left_out(rep: dict) -> Dict[str, str]:
    """The expected backends the run did not time, each with the reason the file gives ("" where
    it gives none): a backend missing from ``backends`` (a file without that list: none missing),
    or named in ``skipped_backends``."""
    device = device_type(rep["environment"].get("device", "?"))
    timed = rep.get("backends")
    skipped = rep.get("skipped_backends") or {}
    return {b: str(skipped.get(b) or "") for b in EXPECTED_BACKENDS.get(device, ())
            if b in skipped or (timed is not None and b not in timed)}


def _cell(target: Target, row: Optional[dict], table: dict, loop: bool, missing: Dict[str, str]) -> str:
    if target.backend in missing:
        why = missing[target.backend].replace("|", "\\|")  # (a "|" would split the Markdown cell)
        return f"not run (left out{': ' + why if why else ''}) | "
    if row is None:
        return "not run | "
    if row.get("error"):
        return "failed | "
    value = target.value(row, table, loop)
    if value is None:
        return "- | "
    if not _valid(value):
        return f"{value:.3f} {target.unit} | invalid"
    return f"{value:.3f} {target.unit} | {'yes' if target.met(value) else '**no**'}"


def report(path: Path) -> List[str]:
    """Markdown lines for one bench JSON: a heading naming device, commit and date, then one
    table per layout that has targets (none: a line saying so). OSError or ValueError where the
    file cannot be read or is not JSON."""
    rep = json.loads(path.read_text())
    if not isinstance(rep, dict) or "environment" not in rep or "tables" not in rep:
        return [f"### {path.name}: not a bench report (lbw-kernels bench --out writes those)", ""]
    env = rep["environment"]
    device = env.get("device", "?")
    commit = (env.get("git_commit") or "unknown")[:10]
    lines = [f"### {path.name}: {env.get('device_name', device)}, commit {commit}, {env.get('date', '?')[:10]}", ""]
    backends = list(rep.get("backends") or [])
    missing = left_out(rep)
    tables = 0
    for table in rep["tables"]:
        targets = targets_for(device, table["layout"])
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
                cell = _cell(t, rows.get(t.row + suffix), table, on_loop, missing)
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
    # (none named: argparse's own error, exit 2; device_check.sh checks its glob matched first)
    ap.add_argument("reports", nargs="+", type=Path, help="bench.json files (lbw-kernels bench --out)")
    args = ap.parse_args(argv)
    unreadable = 0
    for path in args.reports:
        try:
            lines = report(path)
        except (OSError, ValueError) as err:  # (json's errors are ValueErrors)
            # Said where the tables would be, and in the exit status: a missing table must not
            # read as a clean run.
            unreadable += 1
            lines = [f"### {path.name}: cannot be read ({type(err).__name__}: {err})", ""]
            print(f"targets.py: {path}: {type(err).__name__}: {err}", file=sys.stderr)
        print("\n".join(lines))
    return 1 if unreadable else 0


if __name__ == "__main__":
    sys.exit(main())
