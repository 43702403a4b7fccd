"""Options of the download stage, with img2dataset's names where it has one."""
from __future__ import annotations

from dataclasses import dataclass, field

from clipfleet.shared.options import not_negative, option, positive, validate
from clipfleet.workers.download.consent import CONVENTIONS, DEFAULT_RESPECT, check_respect, turned_off

RESIZE_MODES = ("no", "keep_ratio", "center_crop", "border", "keep_ratio_largest")
ENCODE_FORMATS = ("jpg", "png", "webp")
DECONTAMINATE_MODES = ("mark", "drop")
# Hamming distance (of 64 bits) within which two pHashes are one picture. Calibrated on the sandbox
# world (tests/workers/download/test_phash.py): planted copies (re-encoded at quality 40, half
# size, cropped 3%) come within it, distinct pictures stay well above.
PHASH_DISTANCE = 10


@dataclass
class DownloadOptions:
    image_size: int = option(256, "resize images to this many pixels", check=positive)
    resize_mode: str = option("border", "how images are fitted to --image-size", choices=RESIZE_MODES)
    encode_format: str = option("jpg", "format of the stored images", choices=ENCODE_FORMATS)
    encode_quality: int = option(95, "jpg/webp quality (0-100), png compression (0-9)")
    min_image_size: int = option(0, "drop images whose smaller side is under this", check=not_negative)
    # None, not infinity: run.json stays standard JSON (jq and browsers refuse Infinity).
    max_aspect_ratio: float | None = option(None, "drop images longer than this ratio (default: no limit)",
                                            check=positive)
    resize_only_if_bigger: bool = option(False, "leave an image that already fits as it is: no enlarging, "
                                                "padding or cropping")
    skip_reencode: bool = option(False, "store the downloaded bytes of an image that is not resized and "
                                        "already in --encode-format (still decoded once, as a check)")
    allow_private_addresses: bool = option(
        False, "let the downloader fetch loopback and private addresses (off by default; for local tests); "
               "link-local, multicast and reserved addresses stay refused")
    user_agent_token: str | None = option(None, "added to the downloader's user agent so site owners can reach you")
    contact: str | None = option(None, "a URL or e-mail address put in the user agent, where site owners reach "
                                       "whoever runs the crawl (a run against public hosts without one warns)",
                                 metavar="URL_OR_EMAIL")
    respect: list[str] = option(DEFAULT_RESPECT, "the opt-out conventions honoured and the usage category they "
                                                 f"are read for: all or some of {', '.join(CONVENTIONS)}; "
                                                 "train-ai. Leaving one out is warned about once per run",
                                check=check_respect, metavar="CONVENTIONS")
    do_not_train: str | None = option(None, "file or URI of domains and URL prefixes (one a line, e.g. exported "
                                            "from an opt-out registry) never requested", metavar="FILE")
    download_threads: int = option(64, "fetching threads per download process", check=positive)
    download_timeout: float = option(10.0, "seconds of network time per image, all redirects and retries",
                                     check=positive)
    download_retries: int = option(2, "extra attempts for transient failures: 5xx, 429, resets",
                                   check=not_negative)
    max_image_bytes: int = option(32 * 2**20, "per image as downloaded", check=positive)
    max_image_pixels: int = option(89_478_484, "checked on the header before decoding (LAION's limit)",
                                   check=positive)
    disallowed_header_directives: list[str] = option(
        ["noai", "noimageai"], "X-Robots-Tag directives that mean an image is not used, comma list, "
                               "empty for none")
    domain_max_concurrency: int = option(16, "requests in flight per host across the fleet, 0 for no limit",
                                         check=not_negative)
    domain_max_rate: float = option(0.0, "an explicit cap on requests per second per host across the fleet, "
                                         "on top of the adaptive pace; 0 for none", check=not_negative)
    ignore_robots_txt: bool = option(False, "do not fetch or obey robots.txt (logged as a warning by every "
                                            "download worker); X-Robots-Tag opt-outs still hold")
    robots_also: list[str] = option([], "robots.txt user-agent groups obeyed besides clipfleet's (each "
                                        "falling back to *), comma list, e.g. CCBot for URLs from Common Crawl",
                                    metavar="TOKENS")
    blocklist: str | None = option(None, "file or URI of URLs, md5/sha256 digests and phash:<16 hex>/<distance> "
                                         "perceptual hashes (one a line) never stored", metavar="FILE")
    decontaminate: str | None = option(None, "an evaluation set: a folder of its images or a parquet of their "
                                             "`phash`; samples whose picture matches one are marked (images/ "
                                             "column `contaminated`) or dropped", metavar="DIR|PARQUET")
    decontaminate_mode: str = option("mark", "what --decontaminate does to a matching sample",
                                     choices=DECONTAMINATE_MODES)
    decontaminate_distance: int = option(PHASH_DISTANCE, "Hamming distance (of 64 bits) within which a picture "
                                                         "matches a --decontaminate hash", check=not_negative)

    not_honoured: list[str] = field(default_factory=list)  # derived from the options above; no flag

    def __post_init__(self):
        validate(self)
        if self.encode_format == "png" and not 0 <= self.encode_quality <= 9:
            raise ValueError("for png, --encode-quality is the compression level, 0 to 9")
        self.disallowed_header_directives = [d.strip().lower() for d in self.disallowed_header_directives
                                             if d.strip()]
        self.robots_also = [t.strip().lower() for t in self.robots_also if t.strip()]
        self.respect = [r.strip().lower() for r in self.respect if r.strip()]
        # What this run does not honour, written into run.json for the dataset card to say.
        self.not_honoured = turned_off(self)
