"""Write OUTDIR/gpu_check.json from the JUnit files of scripts/gpu_check.sh and what this machine reports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path


def junit_counts(path: Path) -> dict:
    if not path.exists():
        return {"error": f"{path.name} missing"}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    total["passed"] = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return {**total, "failed_tests": failed}


COMBINATION = re.compile(
    r"test_combination\[(?P<inp>[a-z0-9]+)-(?P<out>[a-z0-9]+)(?:-(?P<compute>\d+[A-Z]))?-sparse_(?P<side>[ab])"
    r"-A(?P<a>row|col)-B(?P<b>row|col)-(?P<expect>ok|refused|layout)\]"
)


def combinations(path: Path) -> list[dict]:
    """Outcome of every ``test_combination`` case of tests/gemm/test_plan_gpu.py: what the GPU run verified."""
    if not path.exists():
        return []
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        match = COMBINATION.search(case.get("name", ""))
        if match is None:
            continue
        failed = case.find("failure") is not None or case.find("error") is not None
        skipped = case.find("skipped") is not None
        rows.append({**match.groupdict(), "outcome": "failed" if failed else "skipped" if skipped else "passed"})
    return rows


def main(outdir: str) -> int:
    out = Path(outdir)
    summary: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        summary["nvidia_smi"] = smi
    except Exception as exc:  # no nvidia-smi: say so
        summary["nvidia_smi"] = f"unavailable: {exc}"
    try:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)
        summary["device"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        summary["compute_capability"] = f"{props['major']}.{props['minor']}"
        summary["gpus"] = cupy.cuda.runtime.getDeviceCount()
        summary["cupy"] = cupy.__version__
        summary["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        summary["driver"] = cupy.cuda.runtime.driverGetVersion()
    except Exception as exc:
        summary["device"] = f"unavailable: {exc}"
    try:
        import pycusparselt
        from pycusparselt._native.library import load

        loaded = load()
        summary["cusparselt"] = ".".join(map(str, loaded.version))
        summary["cusparselt_path"] = loaded.path
        summary["pycusparselt"] = pycusparselt.__version__
    except Exception as exc:
        summary["cusparselt"] = f"unavailable: {exc}"
    summary["pytest_gpu"] = junit_counts(out / "junit_gpu.xml")
    if (out / "junit_gpu_alone.xml").exists():  # the tests marked `alone`, run after the pytest-xdist run
        summary["pytest_gpu_alone"] = junit_counts(out / "junit_gpu_alone.xml")
    summary["pytest_cpu"] = junit_counts(out / "junit_cpu.xml")
    summary["combinations"] = combinations(out / "junit_gpu.xml")
    probe = out / "probe_summary.json"
    if probe.exists():
        summary["probe"] = {name: rec["status"] for name, rec in json.loads(probe.read_text()).items()}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in summary if k not in ("probe", "combinations")}, indent=1))
    # a part of the check that did not run (scripts/gpu_check.sh OUTDIR bench) is not a failure
    ok = all(summary[k].get("failures", 1) == 0 and summary[k].get("errors", 1) == 0
             for k in ("pytest_gpu", "pytest_cpu") if "missing" not in str(summary[k].get("error", "")))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "gpu_check_out"))
