"""Parsing ``NxF`` shape options (tokens x features) for the sub-commands."""

from __future__ import annotations

import re

from ..errors import AllocationError


def parse_shape(text: str, option: str, example: str = "4096x32768") -> tuple[int, int]:
    """``"N x F"`` -> (N, F), both >= 1, or AllocationError naming ``option``."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or min(int(match.group(1)), int(match.group(2))) < 1:
        raise AllocationError(f"{option} must look like {example} (tokens x features, both >= 1), got {text!r}")
    return int(match.group(1)), int(match.group(2))
