"""What a settled run publishes besides its shards: the run-wide filters (refilter.py, nearfilter.py)
and the dataset card (card.py). `clipfleet run` publishes when the run it follows settles; for a
`--detach`ed run the fleet's sweeper does (shared/recovery.py FleetSweeper), so both end the same."""
from __future__ import annotations

import logging

from clipfleet.shared.storage import Store

log = logging.getLogger(__name__)


def publish_settled(store: Store, cfg, states) -> list[str]:
    """Apply the filter in force across the whole run (only now are all its scores known), then
    write the card. Both are idempotent: publishing again changes nothing. Returns what was done."""
    from clipfleet.workers.publish.card import write_card
    from clipfleet.workers.publish.refilter import in_force, refilter
    said = []
    settings = in_force(store, cfg)
    tagged = next((s.n_done for s in states if s.stage == "tag"), 0)
    if settings and tagged:
        name = " and ".join(([f"keep-top-percent {settings['percent']}"] if settings["percent"] else [])
                            + (["keep-near"] if settings["near_targets"] else []))
        said.append(f"{name}: {refilter(store, **settings)['published']} samples published")
    card = write_card(store)
    if card:
        said.append(f"dataset card: {card}")
    for line in said:
        log.info("%s: %s", store.uri, line)
    return said


__all__ = ["publish_settled"]
