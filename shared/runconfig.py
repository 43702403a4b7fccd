"""`run.json`: what a run was asked to do. Written once by the producer, read by every worker.

Stage options live in one dataclass so the producer, the workers and `--help` agree on names
and defaults. Workers cache the config per store, since it does not change during a run.
"""
from __future__ import annotations

import dataclasses
import functools
import platform
import time
from dataclasses import dataclass, field

from shared.storage import Store

RUN_FILE = "run.json"


@dataclass
class RunConfig:
    store: str
    inputs: list[str] = field(default_factory=list)   # WAT URIs or URL parquet URIs
    input_kind: str = "wat"                           # "wat" starts at extract, "urls" at download
    until: str = "index"                              # last stage to run
    shard_size: int = 10_000
    # extract
    min_alt_length: int = 5
    max_alt_length: int = 2000
    max_url_length: int = 2048
    drop_extensions: tuple[str, ...] = (".svg", ".gif")
    # lid.176.ftz scores short English alts low (0.25-0.5); 0.3 keeps them while camera
    # file names still fall under it (measured on the sandbox's captions, see workers/extract.py)
    min_language_score: float = 0.3
    dedup_by: str = "url"                             # "url", or "uid" (url + caption, LAION-400M's way)
    # download
    image_size: int = 256
    resize_mode: str = "border"
    encode_format: str = "jpg"
    encode_quality: int = 95
    min_image_size: int = 0
    max_aspect_ratio: float = float("inf")
    resize_only_if_bigger: bool = False
    skip_reencode: bool = False
    allow_private_addresses: bool = False
    user_agent_token: str | None = None
    url_col: str = "url"
    caption_col: str = "caption"
    download_threads: int = 64                        # fetching threads per download process
    download_timeout: float = 10.0                    # network seconds per image: all hops, retries, body
    download_retries: int = 2                         # extra attempts, for transient failures only
    max_image_bytes: int = 32 * 2**20                 # per image as downloaded
    max_image_pixels: int = 89_478_484                # LAION's limit, read from the header before decoding
    disallowed_header_directives: list[str] = field(default_factory=lambda: ["noai", "noimageai"])
    domain_max_concurrency: int = 16                  # requests in flight per host, fleet-wide; 0 = no limit
    domain_max_rate: float = 20.0                     # request starts per second per host, fleet-wide; 0 = no limit
    blocklist: str | None = None                      # file or URI of URLs and md5/sha256 digests never stored
    # clip filter / embed (used by later stages)
    filter_model: str = "ViT-B-32/openai"
    multilingual_filter_model: str = "xlm-roberta-base-ViT-B-32/laion5b_s13b_b90k"
    embed_model: str = "ViT-L-14/openai"
    min_similarity_en: float = 0.28
    min_similarity_other: float = 0.26
    created_at: float = field(default_factory=time.time)
    versions: dict = field(default_factory=dict)

    def save(self, store: Store) -> None:
        from shared import __version__
        self.versions = {"clipfleet": __version__, "python": platform.python_version()}
        store.write_json(RUN_FILE, dataclasses.asdict(self))

    @classmethod
    def load(cls, store: Store) -> "RunConfig":
        raw = store.read_json(RUN_FILE)
        known = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in raw.items() if k in known})
        cfg.drop_extensions = tuple(cfg.drop_extensions)
        return cfg

    def same_work(self, other: "RunConfig") -> bool:
        """Two configs describe the same run when everything but timestamps matches."""
        skip = {"created_at", "versions"}
        a, b = dataclasses.asdict(self), dataclasses.asdict(other)
        return {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}


@functools.lru_cache(maxsize=32)
def load_cached(store_uri: str) -> RunConfig:
    return RunConfig.load(Store(store_uri))
