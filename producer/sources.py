"""Where WAT inputs come from: local paths, https:// or s3:// URIs, or a crawl's listing."""
from __future__ import annotations


def wat_inputs(specs: list[str]) -> list[str]:
    return list(specs)


def crawl_inputs(crawl: str, count: int, seed: int | None = None) -> list[str]:
    raise NotImplementedError("--crawl is not built yet")
