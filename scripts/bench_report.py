"""Write docs/benchmarks.md (and the plot) from a benchmark results JSON.

Usage::

    python scripts/bench_report.py benchmarks/results/bench_h100_DATE.json
        [--host-overhead HOST.json] [--notes NOTES.md] [--plot PNG] [--out docs/benchmarks.md]

``RESULTS.json`` is what ``python -m pycusparselt bench --json`` writes. The host-overhead measurement
(``benchmarks/host_overhead.py --json``) is taken from ``--host-overhead`` or, when the results already hold
it, from the results. ``--notes`` is a markdown file of analysis placed under the targets table (the reasons
behind missed targets). The plot is written when matplotlib is installed; an existing PNG given with
``--plot`` is linked as it is otherwise. Needs no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pycusparselt import bench

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="JSON written by python -m pycusparselt bench --json")
    parser.add_argument("--host-overhead", metavar="JSON", help="JSON written by benchmarks/host_overhead.py")
    parser.add_argument("--notes", metavar="MD", help="markdown placed under the targets table")
    parser.add_argument("--plot", metavar="PNG", help="plot to write (or link); default: RESULTS with .png")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"), help="the page to write")
    args = parser.parse_args(argv)

    with open(args.results, encoding="utf-8") as f:
        results = json.load(f)
    if args.host_overhead:
        try:
            with open(args.host_overhead, encoding="utf-8") as f:
                results["host_overhead"] = json.load(f)
        except (OSError, ValueError) as exc:
            print(f"--host-overhead not read ({exc}); the report goes without it", file=sys.stderr)
    notes = Path(args.notes).read_text(encoding="utf-8") if args.notes else None
    plot_path = args.plot or str(Path(args.results).with_suffix(".png"))
    why = bench.plot(results, plot_path)
    if why and not os.path.isfile(plot_path):
        print(f"no plot: {why}", file=sys.stderr)
        plot_ref = None
    else:
        if why:
            print(f"plot not redrawn ({why}); linking the existing {plot_path}", file=sys.stderr)
        plot_ref = os.path.relpath(plot_path, os.path.dirname(os.path.abspath(args.out)))
    source = os.path.relpath(os.path.abspath(args.results), ROOT)
    page = bench.markdown_report(results, plot_path=plot_ref, notes=notes, source=source, api=True)
    Path(args.out).write_text(page, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
