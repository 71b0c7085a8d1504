"""Sphinx configuration for pycusparselt's documentation (built by CI with warnings as errors)."""

project = "pycusparselt"
author = "the pycusparselt developers"
copyright = "2026, the pycusparselt developers"
release = "0.1.0"

# myst_parser: docs/benchmarks.md is markdown, written by benchmarks/tables.py (gemm) from the results JSON
extensions = ["sphinx.ext.autodoc", "sphinx.ext.intersphinx", "numpydoc", "myst_parser"]
autodoc_member_order = "bysource"
autodoc_typehints = "none"
numpydoc_show_class_members = False
numpydoc_xref_param_type = False
intersphinx_mapping = {}
exclude_patterns = ["_build"]
html_theme = "alabaster"
# every cross-reference must resolve; the standard library's and NumPy's have no inventory offline
nitpicky = True
nitpick_ignore_regex = [(r"py:.*", r"(enum|numpy|typing|collections\.abc)\..*")]
