"""`benchmarks/run.py` in several fresh processes, and the spread of its figures across them.

    python benchmarks/repeat_processes.py --processes 5 -- --device cpu \
        --skip accuracy,click,train,pipeline

On the CPU machines of this project a figure moves by up to ±20 % between processes of the
same script (BENCHMARKS.md), more than within one process; one run's ratio therefore says
little about how often a target is met. This runs `run.py` with the arguments after ``--``
in N processes one after the other and prints, for every numeric figure, the median, the
minimum and the maximum over the processes, and for each figure with a target (run.py's
``targets``: the performance issue's bounds, each with its direction) how many processes
met it. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def spread(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per numeric key (present in every result): median, min, max; for keys with a target
    in every result's ``targets``: the bound, its direction and how many met it."""
    out: dict[str, Any] = {"processes": len(results)}
    keys = sorted(set.intersection(*(set(r) for r in results))) if results else []
    for key in keys:
        values = [r[key] for r in results]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            continue
        out[key] = {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "values": values,
        }
        marks = [r.get("targets", {}).get(key) for r in results]
        if all(marks):
            out[key]["target"] = marks[0]["target"]
            out[key]["better"] = marks[0]["better"]
            out[key]["met"] = sum(bool(m["met"]) for m in marks)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        cut = argv.index("--")
        own, passed = argv[:cut], argv[cut + 1 :]
    else:
        own, passed = argv, []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(own)
    if args.processes < 1:
        parser.error(f"--processes must be >= 1, got {args.processes}")
    if any(a == "--out" or a.startswith("--out=") for a in passed):
        parser.error("run.py's --out is set here, one file per process; drop it after --")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.processes):
            out = Path(tmp) / f"run{i}.json"
            cmd = [sys.executable, str(REPO / "benchmarks" / "run.py"), *passed, "--out", str(out)]
            proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL)
            if proc.returncode != 0 or not out.exists():
                print(f"error: process {i + 1} failed (exit {proc.returncode})", file=sys.stderr)
                return 1
            results.append(json.loads(out.read_text()))
            print(f"[process {i + 1}/{args.processes}] done", file=sys.stderr, flush=True)
    summary = spread(results)
    summary["run_args"] = passed
    for key, s in summary.items():
        if isinstance(s, dict) and (key.startswith("ratio_") or key.endswith("_ms")):
            met = ""
            if "met" in s:
                sign = "<=" if s["better"] == "lower" else ">="
                met = f", {s['met']}/{len(s['values'])} {sign} {s['target']:.4g}"
            print(f"{key}: median {s['median']:.4g} (min {s['min']:.4g}, max {s['max']:.4g}{met})")
    if args.out:
        args.out.write_text(json.dumps(summary, sort_keys=True) + "\n")
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
