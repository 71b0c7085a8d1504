"""Reading a layer file's members as the tests inspect and tamper with them."""

from __future__ import annotations

import json

import numpy as np


def read_members(path) -> tuple[dict, dict]:
    """``(meta, arrays)`` of the layer file at ``path``: its JSON metadata and its other arrays by name."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return json.loads(str(arrays.pop("meta"))), arrays
