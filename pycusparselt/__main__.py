"""``python -m pycusparselt``: see :mod:`pycusparselt.cli`."""

from .cli import main

raise SystemExit(main())
