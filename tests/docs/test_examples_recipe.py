"""The three-step recipe example (examples/recipe_digits.py) runs on the CPU and shows the recipe's
effects: retraining with the mask fixed recovers accuracy, and channel permutations lose less to
pruning (at the example's fixed seed; over seeds 0-7 they gained 0.4 to 3.1 points right after
pruning, so this holds with a margin)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "recipe_digits.py"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                                reason="the recipe example needs scikit-learn (the digits data set)")

ROW = re.compile(r"^(no permutation|channel permutations)\s+([\d.]+)%\s+([\d.]+)%\s+([\d.]+)%$", re.M)


@pytest.fixture(scope="module")
def output() -> str:
    # -P: the installed package, not the checkout
    result = subprocess.run([sys.executable, "-P", str(EXAMPLE)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_prints_the_accuracy_table(output):
    assert "test accuracy           dense    2:4 pruned   2:4 retrained" in output
    rows = {m.group(1): tuple(float(v) for v in m.group(2, 3, 4)) for m in ROW.finditer(output)}
    assert set(rows) == {"no permutation", "channel permutations"}
    for dense, pruned, retrained in rows.values():
        assert dense > 90 and retrained > 90
        assert retrained >= pruned  # step 3 recovers what step 2 lost
    # the permutations change nothing before pruning ...
    assert rows["no permutation"][0] == rows["channel permutations"][0]
    # ... and keep more right after it
    assert rows["channel permutations"][1] >= rows["no permutation"][1]


def test_permutations_keep_more_magnitude(output):
    lines = {name: re.findall(r"W\d\s+([\d.]+)%", line) for line in output.splitlines()
             for name in ("no permutation", "channel permutations")
             if line.startswith(name) and "W1" in line}
    plain = [float(v) for v in lines["no permutation"]]
    permuted = [float(v) for v in lines["channel permutations"]]
    assert len(plain) == len(permuted) == 3
    assert all(p >= q for p, q in zip(permuted, plain, strict=True))


def test_oracle_path_agrees_with_numpy(output):
    m = re.search(r"reference\.matmul .*accuracy ([\d.]+)%, (\d+)/(\d+) predictions as in NumPy", output)
    assert m is not None, output
    same, total = int(m.group(2)), int(m.group(3))
    assert same >= total - 1  # float64-accumulated oracle vs float32 NumPy: a near-tie may flip
