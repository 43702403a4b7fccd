"""Options of the tagging stage."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TagOptions:
    pass
