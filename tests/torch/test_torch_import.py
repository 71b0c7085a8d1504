"""``import pycusparselt.torch`` without PyTorch fails at once, with the install hint (runs with or without
PyTorch installed: the subprocess hides it)."""

from __future__ import annotations

import subprocess
import sys


def test_importing_without_pytorch_fails_with_the_install_hint():
    code = "import sys; sys.modules['torch'] = None\nimport pycusparselt.torch"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        'ImportError: pycusparselt.torch needs PyTorch, which is not installed: pip install "pycusparselt[torch]"')


def test_the_rest_of_the_package_imports_without_pytorch():
    code = "import sys; sys.modules['torch'] = None\nimport pycusparselt, pycusparselt.nn.linear; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
