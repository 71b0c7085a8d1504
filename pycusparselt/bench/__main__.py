"""``python -m pycusparselt.bench``: the same as ``python -m pycusparselt bench``."""

import sys

from . import main

sys.exit(main())
