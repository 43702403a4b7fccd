"""Options of `clipfleet serve` (and what `subset` shares with it), declared once as the stage
options are, so every one is a flag with its help. They are not part of run.json: how a run is
served is the server's business, and one run can be served in several ways."""
from __future__ import annotations

from dataclasses import dataclass

from clipfleet.shared.options import option


def _positive(value) -> str | None:
    return None if value > 0 else "must be positive"


@dataclass
class ServeSettings:
    host: str = option("127.0.0.1", "address to listen on; 127.0.0.1 keeps the service on this machine, "
                                    "0.0.0.0 opens it to the network")
    port: int = option(1234, "port to listen on (clip back's default)", check=_positive)
    workers: int = option(1, "server processes; each maps the index and metadata and loads the model once",
                          check=_positive)
    index_name: str | None = option(None, "name of the index in /indices-list (default: the store's last "
                                          "path component)")
    cache_dir: str | None = option(None, "where the memory-mappable metadata is built once (default: "
                                         "~/.cache/clipfleet/search/, or $CLIPFLEET_STATE_DIR/search/)",
                                   metavar="DIR")
    max_request_bytes: int = option(8 * 2**20, "largest request body (a base64 image upload is most of it)",
                                    check=_positive)
    max_num_images: int = option(10_000, "num_images above this is lowered to it (reported in a header)",
                                 check=_positive)
    max_num_result_ids: int = option(10_000, "num_result_ids above this is lowered to it (reported in a header)",
                                     check=_positive)
    max_search_depth: int = option(100_000, "most candidates one query may search while filters remove results",
                                   check=_positive)
    query_timeout: float = option(10.0, "seconds one query may take; deeper searches stop at it and say so in "
                                        "a header", check=_positive)
    concurrency: int = option(64, "requests in flight per worker; more get a 503 at once instead of queueing",
                              check=_positive)
    image_url_timeout: float = option(5.0, "seconds of network time to fetch an image_url query",
                                      check=_positive)
    max_image_bytes: int = option(16 * 2**20, "largest image fetched for an image_url query", check=_positive)
    max_image_pixels: int = option(89_478_484, "largest image (width x height) decoded for a query, checked on "
                                               "its header", check=_positive)
    allow_private_image_urls: bool = option(
        False, "let image_url queries reach loopback and private addresses (off: a public server must not "
               "become a way into its own network)")
