"""Writing the registry's measured tables (`diffattn/kernels/tuned/<device kind>.json`) from benchmark rows.

One rule for every benchmark that tunes: backends ordered by the geometric mean of (time / fastest time) over the
cases each ran, a backend counted only if it ran at least half of them (`geomean_order`); one row merged into the
device's file with the other operations and rows kept (`merge_table_row`).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def command_line(argv: list[str] | None = None) -> str:
    """The benchmark's command as a user would type it, for a table row's `generated_by`: `diffattn` and the
    arguments after the program name (which already start with `bench <name>` when run through the CLI)."""
    return " ".join(["diffattn", *(sys.argv[1:] if argv is None else argv)])


def geomean_order(times_by_case: dict[str, dict[str, float]], digits: int | None = 4) -> dict | None:
    """{"order": fastest first, "geomean_time_vs_fastest": {name: score}, "cases": sorted case names}; None if
    no case has a time. NaN times (a backend that failed) are left out of their case."""
    by_case = {c: {n: t for n, t in times.items() if t == t} for c, times in times_by_case.items()}
    by_case = {c: times for c, times in by_case.items() if times}
    if not by_case:
        return None
    logs: dict[str, list[float]] = {}
    for times in by_case.values():
        best = min(times.values())
        for n, t in times.items():
            logs.setdefault(n, []).append(math.log(t / best))
    score = {n: math.exp(sum(v) / len(v)) for n, v in logs.items() if 2 * len(v) >= len(by_case)}
    if digits is not None:
        score = {n: round(s, digits) for n, s in score.items()}
    return {"order": sorted(score, key=score.get), "geomean_time_vs_fastest": score, "cases": sorted(by_case)}


def merge_table_row(kind: str, device_name: str, op: str, key: str, row: dict) -> Path:
    """Merge `row` as `ops[op][key]` into the device kind's table (DIFFATTN_TUNED_DIR redirects it, for tests);
    the names are checked by the registry's parser before anything is written."""
    from ..kernels import backends as registry

    path = registry.tuned_dir() / f"{kind}.json"
    data = json.loads(path.read_text()) if path.is_file() else {"device": device_name, "ops": {}}
    data.setdefault("ops", {}).setdefault(op, {})[key] = row
    registry.parse_table(json.dumps(data), source=str(path))
    path.write_text(json.dumps(data, indent=1) + "\n")
    registry.clear_cache()
    return path
