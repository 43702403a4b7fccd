"""The filter judges the picture, not its padding: on a world of aspect ratios from 1:2 to 2.5:1,
stored in img2dataset's default `border` mode (a wide image is a thin strip in a white square),
right pairs are kept as often in every aspect-ratio band as in the square one."""
from __future__ import annotations

import pytest

from clipfleet.sandbox.filter_recall import SQUARE, measure, report, worst_band_gap
from clipfleet.shared.pipeline import execute
from clipfleet.shared.storage import Store
from clipfleet.workers.clip.stage import ClipStage
from tests.workers.clip.conftest import clip_run, copy_images, download_world

ASPECT_SAMPLES = 480
ASPECT_SHARD_SIZE = 160
ASPECT_SHARDS = (0, 1, 2)


@pytest.fixture(scope="session")
def letterboxed(tmp_path_factory, session_redis):
    return download_world(tmp_path_factory, session_redis, "aspect-world", samples=ASPECT_SAMPLES, seed=5,
                          resize_mode="border", shard_size=ASPECT_SHARD_SIZE, wrong_caption_share=0.3,
                          aspects=(0.5, 2.5))


def test_recall_of_right_pairs_does_not_depend_on_aspect_ratio(tmp_path, letterboxed):
    store_uri = str(tmp_path / "store")
    copy_images(letterboxed, store_uri, shards=ASPECT_SHARDS)
    cfg = clip_run(store_uri, resize_mode="border")
    stage = ClipStage(cfg)
    for shard in ASPECT_SHARDS:
        execute(stage, Store(store_uri), shard)

    result = measure(letterboxed.world, store_uri)
    print(report(result))
    assert result["unjudged"] == 0 and result["judged"] == ASPECT_SAMPLES
    # The world has what the claim needs: about 30% wrong captions, and every band well filled.
    assert 0.25 <= 1 - result["right"] / result["judged"] <= 0.45, result
    assert len(result["bands"]) == 6 and min(b["right"] for b in result["bands"].values()) >= 25, result
    assert result["precision"] >= 0.95 and result["recall"] >= 0.9, report(result)
    assert result["bands"][SQUARE]["recall"] >= 0.9, report(result)
    assert worst_band_gap(result) <= 0.10, report(result)
