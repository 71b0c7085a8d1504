"""``python -m pycusparselt.distributed``: see :mod:`pycusparselt.distributed.launch`."""

from .launch import main

raise SystemExit(main())
