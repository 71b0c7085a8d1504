"""Compare the cffi declarations in ``build_ffi.py`` with a real ``cusparseLt.h``.

Both texts are parsed with pycparser into a model (function signatures with their const qualifiers, enum
constants with their values, the opaque structures) and compared; :func:`compare` returns one sentence per
difference, so an empty list means the cdef matches the header.

The header is not self-contained (it includes CUDA's ``driver_types.h`` and ``library_types.h``, and
``cusparse.h`` or the wheel's stub), so a small preprocessor drops the directives, keeps the C branch of
``__cplusplus`` conditionals and supplies the outside types for parsing only. Those outside types are
compared separately, against whichever of their own headers is installed (:func:`compare_enum_subset`).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path

from pycparser import c_ast, c_generator, c_parser

_STDINT = """
typedef unsigned long size_t;
typedef signed char int8_t; typedef short int16_t; typedef int int32_t; typedef long int64_t;
typedef unsigned char uint8_t; typedef unsigned short uint16_t; typedef unsigned int uint32_t;
typedef unsigned long uint64_t; typedef unsigned long uintptr_t;
"""


@dataclass
class Declarations:
    """What a declaration text declares, in comparable form."""

    functions: dict[str, str] = field(default_factory=dict)  # name -> "ret(param types)"
    enums: dict[str, dict[str, int]] = field(default_factory=dict)  # typedef name -> {constant: value}
    structs: dict[str, str] = field(default_factory=dict)  # typedef name -> struct body


def strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def preprocess_header(text: str) -> str:
    """Keep what a C compiler (not C++) sees, minus includes and macro definitions."""
    out: list[str] = []
    stack: list[tuple[bool, bool]] = []  # (this branch active, some branch taken)

    def active() -> bool:
        return all(flag for flag, _ in stack)

    joined = re.sub(r"\\\n", " ", strip_comments(text))  # continuation lines of macros
    for line in joined.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            directive = stripped[1:].strip()
            if directive.startswith(("if ", "ifdef", "ifndef", "if(")):
                cond = _evaluate(directive)
                stack.append((cond, cond))
            elif directive.startswith("elif"):
                flag, taken = stack.pop()
                cond = not taken and _evaluate(directive)
                stack.append((cond, taken or cond))
            elif directive.startswith("else"):
                flag, taken = stack.pop()
                stack.append((not taken, True))
            elif directive.startswith("endif"):
                stack.pop()
            continue  # includes, defines: dropped
        if active():
            out.append(line)
    body = "\n".join(out)
    body = body.replace("CUSPARSELT_API", "")
    return re.sub(r"alignas\s*\(\s*\d+\s*\)", "", body)


def _evaluate(directive: str) -> bool:
    """Truth of an #if as a C compiler without C++, MSVC or Windows sees it (include guards: true)."""
    cond = directive.split(None, 1)[1] if " " in directive else ""
    if directive.startswith("ifdef"):
        return False
    if directive.startswith("ifndef"):
        return True
    for false_name in ("__cplusplus", "_MSC_VER", "_WIN32"):
        if false_name in cond:
            return cond.strip().startswith("!")
    if "__has_include" in cond:
        return False  # take the branch that includes the stub, which we supply ourselves
    if "__STDC_VERSION__" in cond:
        return True
    return True  # include guards: !defined(X)


def _render(node: c_ast.Node) -> str:
    node = copy.deepcopy(node)
    for sub in _walk(node):
        if isinstance(sub, c_ast.TypeDecl):
            sub.declname = None
    text = c_generator.CGenerator().visit(node)
    return re.sub(r"\s+", " ", text).replace("( ", "(").replace(" )", ")").strip()


def _walk(node: c_ast.Node):
    yield node
    for _, child in node.children():
        yield from _walk(child)


def _enum_values(enum: c_ast.Enum, known: dict[str, int]) -> dict[str, int]:
    values: dict[str, int] = {}
    nxt = 0
    for item in enum.values.enumerators if enum.values else []:
        if item.value is None:
            value = nxt
        elif isinstance(item.value, c_ast.Constant):
            value = int(item.value.value.rstrip("uUlL"), 0)
        elif isinstance(item.value, c_ast.ID):
            value = values.get(item.value.name, known.get(item.value.name))
            if value is None:
                raise ValueError(f"enumerator {item.name} refers to unknown {item.value.name}")
        elif isinstance(item.value, c_ast.UnaryOp) and item.value.op == "-":
            value = -int(item.value.expr.value, 0)
        else:
            raise ValueError(f"enumerator {item.name}: unsupported value expression")
        values[item.name] = value
        nxt = value + 1
    return values


def parse(text: str, prelude: str = "") -> Declarations:
    """Parse ``text`` (after ``prelude``, whose declarations are not reported) into :class:`Declarations`."""
    parser = c_parser.CParser()
    prelude_ast = parser.parse(_STDINT + prelude, filename="<prelude>")
    skip = len(prelude_ast.ext)
    ast = c_parser.CParser().parse(_STDINT + prelude + "\n" + text, filename="<decls>")
    decls = Declarations()
    known: dict[str, int] = {}
    for ext in ast.ext[:skip]:  # prelude enums can be referred to
        if isinstance(ext, c_ast.Typedef) and isinstance(ext.type.type, c_ast.Enum):
            known.update(_enum_values(ext.type.type, known))
    for ext in ast.ext[skip:]:
        if isinstance(ext, c_ast.Typedef):
            inner = ext.type.type if isinstance(ext.type, c_ast.TypeDecl) else None
            if isinstance(inner, c_ast.Enum):
                values = _enum_values(inner, known)
                known.update(values)
                decls.enums[ext.name] = values
            elif isinstance(inner, c_ast.Struct):
                decls.structs[ext.name] = _render(inner)
        elif isinstance(ext, c_ast.Decl) and isinstance(ext.type, c_ast.FuncDecl):
            decls.functions[ext.name] = _render(ext.type)
    return decls


def compare(expected: Declarations, actual: Declarations, what: str = "header") -> list[str]:
    """Sentences describing every difference of ``actual`` (our cdef) from ``expected`` (the header)."""
    problems: list[str] = []
    for name, sig in expected.functions.items():
        if name not in actual.functions:
            problems.append(f"function {name} is in the {what} but missing from the cdef")
        elif actual.functions[name] != sig:
            problems.append(f"function {name}: {what} declares {sig}, cdef declares {actual.functions[name]}")
    for name in actual.functions.keys() - expected.functions.keys():
        problems.append(f"function {name} is in the cdef but not in the {what}")
    for name, values in expected.enums.items():
        if name not in actual.enums:
            problems.append(f"enum {name} is in the {what} but missing from the cdef")
            continue
        problems += compare_enum(name, values, actual.enums[name], what)
    for name in actual.enums.keys() - expected.enums.keys():
        problems.append(f"enum {name} is in the cdef but not in the {what}")
    for name, body in expected.structs.items():
        if actual.structs.get(name) != body:
            problems.append(f"struct {name}: {what} declares {body}, cdef declares {actual.structs.get(name)}")
    for name in actual.structs.keys() - expected.structs.keys():
        problems.append(f"struct {name} is in the cdef but not in the {what}")
    return problems


def compare_enum(name: str, expected: dict[str, int], actual: dict[str, int], what: str) -> list[str]:
    problems = compare_enum_subset(name, expected, actual, what)
    for const in actual.keys() - expected.keys():
        problems.append(f"enum {name}: constant {const} is in the cdef but not in the {what}")
    return problems


def compare_enum_subset(name: str, expected: dict[str, int], actual: dict[str, int], what: str) -> list[str]:
    """Every constant of ``actual`` must have the value ``expected`` gives it; ``expected``'s constants that
    ``actual`` lacks are reported too."""
    problems = []
    for const, value in expected.items():
        if const not in actual:
            problems.append(f"enum {name}: constant {const} (= {value}) is in the {what} but missing from the cdef")
        elif actual[const] != value:
            problems.append(f"enum {name}: {const} is {value} in the {what} but {actual[const]} in the cdef")
    return problems


def extract_enums(text: str, names) -> str:
    """Just the ``typedef enum {...} NAME;`` declarations of ``names`` from a (possibly large) header."""
    text = strip_comments(text)
    parts = []
    for name in names:
        match = re.search(r"typedef\s+enum\s*\w*\s*\{[^}]*\}\s*" + re.escape(name) + r"\s*;", text)
        if match is None:
            raise ValueError(f"no enum {name} in the header")
        parts.append(match.group(0))
    return "\n".join(parts)


def read_header(directory: str | Path, name: str) -> str | None:
    path = Path(directory) / name
    return path.read_text() if path.is_file() else None
