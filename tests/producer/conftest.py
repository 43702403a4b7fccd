"""The report and plan tests' run, built once per session (tests/producer/pipeline_store.py)."""
from tests.producer.pipeline_store import built_run, report_world, run_copy  # noqa: F401
