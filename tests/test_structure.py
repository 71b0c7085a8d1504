"""The package's structure, read from its source: layers with one direction of imports, no import circles, no
module using another's private names, and every module named in the package docstring and the architecture
page. Parses the source (nothing is imported), so it runs anywhere."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pycusparselt"
GENERATED = {"pycusparselt._cusparselt_cffi", "pycusparselt._fastcall"}  # written at build time

#: The layers, lowest first: a module may import from its own layer and the ones below, never above.
#: (docs/architecture.rst draws the same picture.)
LAYERS = [
    ("ground", ["pycusparselt.types", "pycusparselt.reference"]),
    ("native floor", ["pycusparselt._native", "pycusparselt.enums", "pycusparselt.errors"]),
    ("bindings", ["pycusparselt.bindings"]),
    ("arrays", ["pycusparselt._arrays"]),
    ("tuning", ["pycusparselt.tuning"]),
    ("gemm", ["pycusparselt.gemm"]),
    ("nn", ["pycusparselt.nn"]),
    ("distributed and PyTorch", ["pycusparselt.distributed", "pycusparselt.torch"]),
    ("tools", ["pycusparselt.bench", "pycusparselt.cli", "pycusparselt.__main__",
               "pycusparselt"]),
]

#: Underscore names that are public API of their owners: NamedTuple's methods and fields.
NAMEDTUPLE_API = {"_asdict", "_replace", "_fields", "_make", "_field_defaults"}
#: Other libraries, whatever name binds them (``torch = sys.modules.get("torch")``): their names are theirs.
OTHER_LIBRARIES = {"torch", "cupy", "cupyx", "np", "numpy", "ml_dtypes", "os", "sys", "cffi", "importlib"}


def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        if name not in GENERATED:
            found[name] = path
    return found


MODULES = _modules()


def layer_of(module: str) -> int:
    """The index in LAYERS of the longest prefix that names ``module``."""
    best, rank = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            inside = module == prefix or (prefix != "pycusparselt" and module.startswith(prefix + "."))
            if inside and len(prefix) > best:
                best, rank = len(prefix), index
    if rank is None:
        raise LookupError(f"{module} is in no layer: add it to LAYERS (and to docs/architecture.rst)")
    return rank


def _package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def imports_of(module: str, tree: ast.AST) -> list[tuple[str, int, str | None]]:
    """``(imported module, line, imported name or None)`` for every import of the package's own modules,
    at module level or inside functions alike."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno, None) for a in node.names if a.name.split(".")[0] == "pycusparselt"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(module).split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "pycusparselt":
                target = node.module
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES or sub in GENERATED:
                    found.append((sub, node.lineno, None))
                else:
                    found.append((target, node.lineno, alias.name))
    return found


def _trees() -> dict[str, ast.AST]:
    return {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


TREES = _trees()


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, tree in TREES.items():
        for target, _, _ in imports_of(name, tree):
            if target in MODULES and target != name:
                graph[name].add(target)
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                circle = visit(nxt)
                if circle:
                    return circle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            circle = visit(node)
            if circle:
                return circle
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``importer -> imported`` for every import of a higher layer. The package's own ``__init__`` modules of
    the layer folders are their layer's; ``pycusparselt`` itself (the public face) is the top."""
    return [f"{name} ({LAYERS[layer_of(name)][0]}) -> {target} ({LAYERS[layer_of(target)][0]})"
            for name, targets in sorted(graph.items()) for target in sorted(targets)
            if layer_of(target) > layer_of(name)]


def private_uses(name: str, tree: ast.AST) -> list[str]:
    """Uses in module ``name`` of private names that belong to other modules: ``from .x import _y``,
    ``x._y`` for an imported module of the package, and ``obj._y`` where this module defines no ``_y``
    (attributes of objects from elsewhere). Dunders, NamedTuple's API and other libraries' names are left
    alone (``torch._C`` is PyTorch's business)."""
    defined: set[str] = set()
    external: set[str] = set(OTHER_LIBRARIES)  # names bound to other libraries' modules or objects
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            defined.add(node.attr)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
            defined.add(node.value)  # __slots__ entries, getattr names
        elif isinstance(node, ast.Import):
            external.update((a.asname or a.name).split(".")[0] for a in node.names
                            if a.name.split(".")[0] != "pycusparselt")
        elif isinstance(node, ast.ImportFrom) and not node.level:
            if (node.module or "").split(".")[0] != "pycusparselt":
                external.update(a.asname or a.name for a in node.names)
    found = []
    for target, line, imported in imports_of(name, tree):
        if imported and imported.startswith("_") and not imported.startswith("__") and target != name:
            found.append(f"{name}:{line} imports {imported} from {target}")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        attr = node.attr
        if not attr.startswith("_") or attr.startswith("__") or attr in NAMEDTUPLE_API or attr in defined:
            continue
        root = node.value
        while isinstance(root, (ast.Attribute, ast.Call, ast.Subscript)):
            root = root.func if isinstance(root, ast.Call) else root.value
        if isinstance(root, ast.Name) and root.id in external:
            continue
        found.append(f"{name}:{node.lineno} uses {ast.unparse(node)}")
    return found


#: The most lines a module may have: one a newcomer can read in a sitting.
MAX_LINES = 900
#: Modules allowed over MAX_LINES: none (the plan's launch objects live in pycusparselt.gemm.launch, the layer's
#: route in pycusparselt.nn.route and its plans' tuning in pycusparselt.nn.layer_plans).
OVER_MAX_LINES: set[str] = set()

#: The one module that defines NumPy dtype constants (docs/architecture.rst: the type table).
TYPE_TABLE = "pycusparselt.types"
#: NumPy's names of element types (``np.float16``): a module-level table of them is a dtype table too.
NUMPY_TYPE_NAMES = {"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16",
                    "uint32", "uint64", "bool_", "half", "single", "double"}


def _is_dtype(node: ast.AST) -> bool:
    """``np.dtype(...)``, an ``ml_dtypes`` type, or a NumPy element type (``np.float16``)."""
    if isinstance(node, ast.Call):
        node = node.func if isinstance(node.func, ast.Attribute) and node.func.attr == "dtype" else None
        return node is not None and isinstance(node.value, ast.Name) and node.value.id in ("np", "numpy")
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        if node.value.id == "ml_dtypes":
            return node.attr not in ("finfo", "iinfo")
        return node.value.id in ("np", "numpy") and node.attr in NUMPY_TYPE_NAMES
    return False


def _holds_dtypes(node: ast.AST) -> bool:
    """Whether ``node`` is a dtype or a collection (tuple, list, set, dict, frozenset(...), a comprehension)
    holding one; a dtype passed to another call (``np.zeros(3, np.int64)``, ``np.float32(x)``) is not."""
    if _is_dtype(node):
        return True
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_holds_dtypes(e) for e in node.elts)
    if isinstance(node, ast.Dict):
        return any(_holds_dtypes(e) for e in [*node.keys, *node.values] if e is not None)
    if isinstance(node, (ast.GeneratorExp, ast.ListComp, ast.SetComp)):
        return _holds_dtypes(node.elt) or any(_holds_dtypes(g.iter) for g in node.generators)
    if isinstance(node, ast.DictComp):
        return _holds_dtypes(node.key) or _holds_dtypes(node.value)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (
            "frozenset", "set", "tuple", "list", "dict"):
        return any(_holds_dtypes(a) for a in node.args)
    return False


def dtype_tables(name: str, tree: ast.AST) -> list[str]:
    """Module-level assignments in ``name`` of dtype constants or collections of them (``np.dtype(...)``,
    an ``ml_dtypes`` type, ``np.float16``). Only :data:`TYPE_TABLE` may have them; the other modules import
    its constants (functions may still convert what they are given)."""
    if name == TYPE_TABLE:
        return []
    return [f"{name}:{node.lineno} defines dtype constants: {ast.unparse(node)[:80]}" for node in tree.body
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None
            and _holds_dtypes(node.value)]


# -- the package ------------------------------------------------------------------------------------------


def test_every_module_is_in_a_layer():
    for name in MODULES:
        layer_of(name)


def test_no_import_circles():
    assert find_circle(_graph()) is None, " -> ".join(find_circle(_graph()))


def test_imports_go_one_way_between_the_layers():
    assert upward_imports(_graph()) == []


def test_no_module_uses_another_modules_private_names():
    found = [use for name, tree in TREES.items() for use in private_uses(name, tree)]
    assert found == []


def long_modules(modules: dict[str, Path] = MODULES, limit: int = MAX_LINES,
                 allowed: set[str] = OVER_MAX_LINES) -> list[str]:
    """``module (lines)`` for every module over ``limit`` lines that is not allowed to be."""
    lengths = {name: len(path.read_text().splitlines()) for name, path in modules.items()}
    return [f"{name} ({n})" for name, n in sorted(lengths.items()) if n > limit and name not in allowed]


def test_no_module_is_over_the_line_limit():
    assert long_modules() == []


def test_dtype_constants_are_defined_in_the_type_table_only():
    found = [table for name, tree in TREES.items() for table in dtype_tables(name, tree)]
    assert found == []


def test_cupy_is_imported_only_where_a_gpu_is_used():
    """``import cupy`` at module level would make the package need CuPy to import: only function-local
    imports (lazy) are allowed, so CPU-only use keeps working. ``pycusparselt.torch`` is PyTorch's face: it
    imports PyTorch when imported (failing with the install hint where it is missing), and nothing below it
    imports it."""
    for name, tree in TREES.items():
        if name == "pycusparselt.torch" or name.startswith("pycusparselt.torch."):
            continue
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in ("cupy", "cupyx", "torch") for n in names), (name, node.lineno)


def test_cupy_itself_is_imported_in_one_module():
    """``import cupy`` happens in ``pycusparselt._native.gpu`` only (on first use, with an install hint where
    CuPy is missing); everything else asks it for the module. CuPy's submodules (``cupy.cuda.nccl``,
    ``cupyx.distributed``) are imported where they are used, after it."""
    found = [f"{name}:{node.lineno}" for name, tree in TREES.items() if name != "pycusparselt._native.gpu"
             for node in ast.walk(tree) if isinstance(node, ast.Import) and any(a.name == "cupy" for a in node.names)]
    assert found == []


def test_the_package_docstring_and_the_architecture_page_name_every_module():
    import pycusparselt

    doc = ast.get_docstring(TREES["pycusparselt"])
    page = (ROOT / "docs" / "architecture.rst").read_text()
    for name in MODULES:
        if name == "pycusparselt":
            continue
        assert re.search(rf"\b{re.escape(name)}\b", page), f"docs/architecture.rst does not name {name}"
        assert re.search(rf"\b{re.escape(name)}\b", doc), f"the package docstring does not name {name}"
    assert pycusparselt.__doc__  # the docstring read above is the one the package has


# -- the checks themselves can fail -------------------------------------------------------------------------


def test_a_circle_is_found():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_an_upward_import_is_found():
    graph = {"pycusparselt.gemm.plan": {"pycusparselt.nn.linear"}, "pycusparselt.nn.linear": set()}
    assert upward_imports(graph) == ["pycusparselt.gemm.plan (gemm) -> pycusparselt.nn.linear (nn)"]


def test_an_arrow_from_the_native_floor_up_to_the_bindings_is_found():
    graph = {"pycusparselt._native.streams": {"pycusparselt.bindings"}, "pycusparselt.bindings": set(),
             "pycusparselt.reference": {"pycusparselt.errors"}, "pycusparselt.errors": set()}
    assert upward_imports(graph) == [
        "pycusparselt._native.streams (native floor) -> pycusparselt.bindings (bindings)",
        "pycusparselt.reference (ground) -> pycusparselt.errors (native floor)",
    ]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from .quantization import _float32\n", "imports _float32 from pycusparselt.nn.quantization"),
        ("from . import quantization\nquantization._float32(1)\n", "uses quantization._float32"),
        ("def f(plan):\n    return plan._layouts\n", "uses plan._layouts"),
        ("import torch\ntorch._C\nclass A:\n    def f(self):\n        self._x = 1\n        return self._x\n", None),
        ("def f(c):\n    return c._asdict()\n", None),
    ],
)
def test_private_uses_are_found(source, expected):
    found = private_uses("pycusparselt.nn.linear", ast.parse(source))
    if expected is None:
        assert found == []
    else:
        assert len(found) == 1 and expected in found[0], found


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("F16 = np.dtype(np.float16)\n", True),
        ("_SUMS = frozenset((np.float16, np.int32))\n", True),
        ("TABLE = {ml_dtypes.bfloat16: 9}\n", True),
        ("from ..types import F16\nTABLE = {F16: 6}\n", False),
        ("TINY = float(ml_dtypes.finfo(F16).tiny)\n", False),
        ("SPLITS = np.array([[0, 1]], dtype=np.int64)\nK = np.float32(0.5)\n", False),
        ("def f(x):\n    return np.dtype(x)\n", False),
    ],
)
def test_a_dtype_table_outside_the_type_table_is_found(source, found):
    assert bool(dtype_tables("pycusparselt.nn.linear", ast.parse(source))) is found
    assert dtype_tables(TYPE_TABLE, ast.parse(source)) == []


def test_a_long_module_is_found(tmp_path):
    path = tmp_path / "long.py"
    path.write_text("x = 1\n" * 12)
    assert long_modules({"pycusparselt.gemm.long": path}, limit=10) == ["pycusparselt.gemm.long (12)"]
    assert long_modules({"pycusparselt.gemm.plan": path}, limit=10) == ["pycusparselt.gemm.plan (12)"]
    assert long_modules({"pycusparselt.gemm.plan": path}, limit=10, allowed={"pycusparselt.gemm.plan"}) == []


def test_a_module_outside_the_layers_is_refused():
    with pytest.raises(LookupError, match="in no layer"):
        layer_of("pycusparselt.somewhere_new")


def test_importing_the_package_installs_no_import_hook():
    """Every module has one import path (no aliases of old paths through ``sys.meta_path``)."""
    import sys

    import pycusparselt  # noqa: F401

    assert [f for f in sys.meta_path if type(f).__module__.startswith("pycusparselt")] == []


def test_every_subpackage_is_installed():
    """pyproject.toml lists packages by name: a new folder left out installs a package that cannot import, which
    an editable install (the checkout) does not show."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(path.parent.relative_to(ROOT).parts) for path in PACKAGE.rglob("__init__.py")}
    assert folders == listed, f"missing from pyproject.toml: {sorted(folders - listed)}; not folders: " \
                              f"{sorted(listed - folders)}"
