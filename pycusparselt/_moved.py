"""The import paths of modules that moved into the layer folders: ``pycusparselt.plan`` is
``pycusparselt.gemm.plan``, the same module object (so ``import pycusparselt.plan``, ``from pycusparselt
import plan`` and ``from pycusparselt.plan import SparseMatmulPlan`` keep working), imported when first asked
for. The package installs :data:`FINDER` on ``sys.meta_path`` when it is imported."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

__all__ = ["MOVED", "FINDER"]

#: Old module name (under the package) -> where it lives now.
MOVED = {
    "devices": "_native.devices",
    "settings": "_native.settings",
    "streams": "_native.streams",
    "timing": "tuning.timing",
    "tuning_cache": "tuning.cache",
    "dtypes": "gemm.dtypes",
    "operands": "gemm.operands",
    "plan": "gemm.plan",
    "oneshot": "gemm.oneshot",
    "graphs": "gemm.graphs",
    "linear": "nn.linear",
    "quantization": "nn.quantization",
    "masks": "nn.masks",
    "permutation": "nn.permutation",
    "layer_files": "nn.layer_files",
}

_PACKAGE = __name__.rpartition(".")[0]


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers for the old names with the modules at their new places."""

    def find_spec(self, fullname: str, path: object = None, target: object = None):  # noqa: ANN201
        package, _, name = fullname.rpartition(".")
        if package != _PACKAGE or name not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def __init__(self) -> None:
        self._specs: dict[str, object] = {}  # old name -> the moved module's own spec, between the two calls

    def create_module(self, spec) -> ModuleType:  # noqa: ANN001
        module = importlib.import_module(f"{_PACKAGE}.{MOVED[spec.name.rpartition('.')[2]]}")
        self._specs[spec.name] = module.__spec__  # the import system sets __spec__ to the old name's: put it back
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._specs.pop(module.__spec__.name)  # here still the old name's spec


FINDER = _MovedModules()


def install() -> None:
    """Put :data:`FINDER` on ``sys.meta_path`` (once)."""
    if FINDER not in sys.meta_path:
        sys.meta_path.append(FINDER)
