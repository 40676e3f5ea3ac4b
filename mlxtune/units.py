"""Byte sizes as users write them in recipes and on the command line, and as we print them."""

from __future__ import annotations

import re

from mlxtune.errors import MlxtuneError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str, where: str = "size") -> int:
    """'16GB' -> 16e9 bytes, '10GiB' -> 10 * 2^30, '512MB', '24 GB'; a bare number is bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise MlxtuneError(f"{where} = {text!r}: expected a size such as \"16GB\" (10^9 bytes), \"10GiB\" (2^30) or \"512MB\"")
    return int(float(m.group(1)) * _UNITS[unit])


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"
