"""Options of the index stage."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class IndexOptions:
    pass
