"""cpu-extract: one Common Crawl WAT segment -> language-tagged, deduplicated URL shards.

The pipeline for one segment, all streaming, one module per job:

    WAT bytes -> metadata records that may hold images          wat.py
      -> page URL, <base>, Links -> IMG@/src links with alt       rules.py
      -> hygiene (alt normalisation, URL resolution and filters)  rules.py
      -> dedup (segment, then run, through Redis)                 dedup.py
      -> URL shards of `shard_size` rows, tagged with lid.176     shards.py

Output: `urls/{segment * 1000 + part:05d}.parquet` with url, caption, page_url, language,
language_score, uid. `language` is the lid.176 ISO code, or "" when the score is under
`min_language_score` (LAION's "no language" bucket); `language_score` is always there.
`uid` is a hex BLAKE2b of url + "\n" + caption.

Every link that does not become a pair is counted under the reason it was dropped, and
those counts go into the segment's marker. Records without an `IMG@` link are not parsed,
so a broken record is counted only when it could have held a pair.
"""
from __future__ import annotations

from collections import Counter, deque
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from clipfleet.shared.language import LanguageTagger
from clipfleet.shared.pipeline import Stage, StageOutput, Stats
from clipfleet.shared.runconfig import RunConfig
from clipfleet.shared.storage import Store
from clipfleet.workers.app import broker_redis
from clipfleet.workers.extract.dedup import RunDedup, bucket_bits, claims_redis, dedup_namespace, url_digest
from clipfleet.workers.extract.rules import extract_pairs
from clipfleet.workers.extract.shards import UrlShardWriter
from clipfleet.workers.extract.wat import NoWarcRecords, open_wat

CLAIM_BATCH = 2000    # URLs per Redis round trip
CLAIMS_IN_FLIGHT = 8  # claim batches sent ahead of the pairs they decide


@contextmanager
def _naming(wat: str):
    """A file no record could be read from fails its shard (not marked done with 0 pairs), and
    the message says which file, so the user fixes that one and runs again."""
    try:
        yield
    except NoWarcRecords as exc:
        raise NoWarcRecords(f"{wat}: {exc}") from None


class ExtractStage(Stage):
    name = "extract"

    def __init__(self, run: RunConfig, redis_client=None):
        super().__init__(run)
        self.tagger = LanguageTagger(run.extract.min_language_score)
        self._redis = redis_client
        self._dedup: RunDedup | None = None

    @property
    def dedup(self) -> RunDedup:
        if self._dedup is None:
            client = self._redis if self._redis is not None else claims_redis(self.options, broker_redis)
            self._dedup = RunDedup(client, dedup_namespace(self.run_config),
                                   bucket_bits(len(self.run_config.inputs)))
        return self._dedup

    def run(self, store: Store, shard: int, out: Path, counts: Stats, wat: str) -> StageOutput:
        cfg = self.options
        stats: Counter = Counter()  # the rules count into a plain Counter: a dict lookup per link
        writer = UrlShardWriter(out, shard, self.run_config.input.shard_size, self.tagger, stats)
        by_uid = cfg.dedup_by == "uid"
        seen: set[bytes] = set()
        duplicates = {"in_segment": 0, "in_run": 0}
        # Claims go to Redis from a thread, in order, while this one parses on: Redis does
        # its part meanwhile instead of us waiting for each reply. The pairs wait beside
        # their claim, and are written in order as the replies come back.
        in_flight: deque = deque()

        def write_claimed(block: bool) -> None:
            while in_flight and (block or in_flight[0][0].done() or len(in_flight) > CLAIMS_IN_FLIGHT):
                reply, pairs = in_flight.popleft()
                ours = reply.result()
                duplicates["in_run"] += len(ours) - sum(ours)
                writer.extend([pair for pair, mine in zip(pairs, ours) if mine])

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dedup-claims") as claims:
            pairs: list[tuple[str, str, str]] = []
            digests: list[bytes] = []

            def send() -> None:
                in_flight.append((claims.submit(self.dedup.claim, digests[:], shard), pairs[:]))
                pairs.clear()
                digests.clear()
                write_claimed(block=False)

            metas = "page-meta" not in self.run_config.download.not_honoured  # --respect
            with open_wat(wat) as source, _naming(wat):
                for pair in extract_pairs(source, cfg, stats, metas):
                    digest = url_digest(f"{pair[0]}\n{pair[1]}" if by_uid else pair[0])
                    if digest in seen:
                        duplicates["in_segment"] += 1
                        continue
                    seen.add(digest)
                    pairs.append(pair)
                    digests.append(digest)
                    if len(digests) >= CLAIM_BATCH:
                        send()
            if digests:
                send()
            write_claimed(block=True)
        writer.flush()
        for where, n in duplicates.items():
            if n:  # a reason that never happened is not in the marker at all, as in the rules
                stats[f"drop_duplicate_{where}"] += n
        stats["pairs"] = sum(stats[f"lang_{b}"] for b in ("en", "other", "none"))
        stats["url_shards"] = len(writer.shards)
        counts.samples_in(stats["img_links"])
        counts.kept(stats["pairs"])
        for name, n in sorted(stats.items()):
            # the rules count into a Counter for speed; their drop reasons are the drop_* names
            (counts.drop if name.startswith("drop_") else counts.add)(name, n)
        return StageOutput(files=writer.files, next_shards=writer.shards)
