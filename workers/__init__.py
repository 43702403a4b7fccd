"""The Celery app, one package per stage, and the registry that lists them (registry.py).

Importing anything under clipfleet.workers fills the stage registry (cheap: specs and options only)."""
from clipfleet.workers import registry  # noqa: F401  (fills shared.stages.REGISTRY)
