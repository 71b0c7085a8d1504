"""Quality and speed of the channel permutation search (pycusparselt.nn.permutation.find_permutation).

Usage::

    python benchmarks/bench_permutation.py [--sizes 256,1024] [--families gaussian,student-t,laplace]
                                           [--budgets 1,10] [--no-trained] [--seed 0] [--json out.json]

For every matrix family, size and time budget it prints the fraction of the total magnitude that
2:4 strip pruning keeps without and with the permutation, the relative improvement, the rounds
and escapes of the search, its wall-clock time and what stopped it. The table is an RST simple
table (docs/workflow.rst quotes it). "trained" rows are the three weights of the MLP trained by
examples/recipe_digits.py (needs scikit-learn).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

from pycusparselt.nn import permutation

FAMILIES = {
    "gaussian": lambda rng, shape: rng.standard_normal(shape),
    "student-t": lambda rng, shape: rng.standard_t(3, size=shape),  # heavy tails, 3 dof
    "laplace": lambda rng, shape: rng.laplace(size=shape),
}


def _budget(text: str) -> float | None:
    return None if text in ("none", "None", "inf") else float(text)


def trained_layers(seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """The weights of the dense MLP of examples/recipe_digits.py (step 1 of its recipe)."""
    path = Path(__file__).resolve().parent.parent / "examples" / "recipe_digits.py"
    spec = importlib.util.spec_from_file_location("recipe_digits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    params, _ = module.train_dense(seed)
    return [(f"trained W{i + 1}", w) for i, w in enumerate(params[::2])]


def run(sizes: list[int], families: list[str], budgets: list[float | None], trained: bool,
        seed: int) -> list[dict]:
    cases: list[tuple[str, np.ndarray]] = []
    for family in families:
        for n in sizes:
            cases.append((family, FAMILIES[family](np.random.default_rng(seed), (n, n))))
    if trained:
        cases += trained_layers(seed)
    rows = []
    for family, w in cases:
        w = np.ascontiguousarray(w, dtype=np.float32)
        for budget in budgets:
            _, report = permutation.find_permutation(w, time_budget=budget, seed=seed)
            row = {"family": family, "shape": list(w.shape), "time_budget": budget}
            row.update(report.as_dict())
            rows.append(row)
            print(f"  {family} {w.shape} budget {budget}: {report}", file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    header = ("family", "shape", "budget", "kept, identity", "kept, permuted", "improvement",
              "rounds", "escapes", "time", "stopped by", "pairs")
    lines = []
    for r in rows:
        budget = "none" if r["time_budget"] is None else f"{r['time_budget']:g} s"
        pairs = "table" if "table" in r["method"] else "random"
        lines.append((
            r["family"], "x".join(map(str, r["shape"])), budget,
            f"{100 * r['kept_fraction_before']:.2f} %", f"{100 * r['kept_fraction_after']:.2f} %",
            f"+{100 * r['relative_improvement']:.2f} %", str(r["iterations"]),
            f"{r['escapes_accepted']}/{r['escapes_tried']}", f"{r['seconds']:.2f} s",
            r["stopped_by"], pairs,
        ))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    rule = "  ".join("=" * w for w in widths)
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([rule, fmt(header), rule, *(fmt(line) for line in lines), rule])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="256,1024", help="square sizes, comma-separated")
    parser.add_argument("--families", default="gaussian,student-t,laplace",
                        help=f"comma-separated, of: {', '.join(FAMILIES)}")
    parser.add_argument("--budgets", default="1,10",
                        help="time budgets in seconds, comma-separated ('none': to convergence)")
    parser.add_argument("--no-trained", action="store_true",
                        help="leave out the trained layers of examples/recipe_digits.py")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the rows and the machine as JSON")
    args = parser.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    unknown = set(families) - set(FAMILIES)
    if unknown:
        parser.error(f"unknown families: {', '.join(sorted(unknown))}")
    trained = not args.no_trained
    if trained and importlib.util.find_spec("sklearn") is None:
        print("scikit-learn is not installed: no trained layers", file=sys.stderr)
        trained = False
    rows = run([int(s) for s in args.sizes.split(",") if s], families,
               [_budget(b) for b in args.budgets.split(",") if b], trained, args.seed)
    machine = {"machine": platform.machine(), "processor": platform.processor(),
               "cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__}
    print(f"{machine['cpus']}-CPU {machine['machine']}, Python {machine['python']}, "
          f"NumPy {machine['numpy']}, seed {args.seed}")
    print()
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
