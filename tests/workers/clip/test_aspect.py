"""The filter judges the picture, not its padding: on a world of aspect ratios from 1:2 to 2.5:1,
stored in img2dataset's default `border` mode (a wide image is a thin strip in a white square),
right pairs are kept as often in every aspect-ratio band as in the square one."""
from __future__ import annotations

from clipfleet.sandbox.filter_recall import SQUARE, measure, report, worst_band_gap
from clipfleet.shared.pipeline import execute
from clipfleet.shared.storage import Store
from clipfleet.workers.clip.stage import ClipStage
from tests.workers.clip.conftest import ASPECT_SAMPLES, ASPECT_SHARDS, clip_run, copy_images


def test_recall_of_right_pairs_does_not_depend_on_aspect_ratio(tmp_path, letterboxed):
    store_uri = str(tmp_path / "store")
    copy_images(letterboxed, store_uri, shards=ASPECT_SHARDS)
    cfg = clip_run(store_uri, resize_mode="border")
    stage = ClipStage(cfg)
    for shard in ASPECT_SHARDS:
        execute(stage, Store(store_uri), shard)

    # The images are letterboxed as stored: every resized one is a square canvas.
    rows = [r for shard in ASPECT_SHARDS for r in letterboxed.rows(shard)]
    assert all(r["width"] == r["height"] == 256 for r in rows)
    assert sum(r["original_width"] / r["original_height"] > 1.9 for r in rows) >= 40

    result = measure(letterboxed.world, store_uri)
    print(report(result))
    assert result["unjudged"] == 0 and result["judged"] == ASPECT_SAMPLES
    # The world has what the claim needs: about 30% wrong captions, and every band well filled.
    assert 0.25 <= 1 - result["right"] / result["judged"] <= 0.45, result
    assert len(result["bands"]) == 6 and min(b["right"] for b in result["bands"].values()) >= 25, result
    assert result["precision"] >= 0.95 and result["recall"] >= 0.9, report(result)
    assert result["bands"][SQUARE]["recall"] >= 0.9, report(result)
    assert worst_band_gap(result) <= 0.10, report(result)
