"""`clipfleet refilter --keep-near` (DataComp's image-based filter) on a finished sandbox run: with
captions of circles as targets ("a red circle", … one per colour, as ImageNet gives many images of a
class), embedded by the run's `shapes` model, the kept samples hold circles at well over their share
of the run and the dropped ones hardly any, by the sandbox's ground truth; combined with --keep-top-percent it
keeps the intersection; twice in a row changes nothing; the card and filtered/filter.json say so."""
from __future__ import annotations

import json
import shutil
from collections import Counter

import pyarrow.parquet as pq

from clipfleet.sandbox.images import COLORS
from clipfleet.shared import layout
from clipfleet.shared.runconfig import RunConfig
from clipfleet.shared.storage import Store
from tests.producer.pipeline_store import built_run, report_world, run_copy  # noqa: F401 (fixtures)
from tests.producer.test_refilter import CLI, REPO, files, published


def refilter(store_dir, *options: str):
    import subprocess
    return subprocess.run(CLI + ["refilter", "--store", str(store_dir), *options],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def shapes(world, store_dir) -> dict[str, str]:
    """key -> the shape its picture truly shows, for every embedded sample of the run."""
    truth = {r["url"]: r["true_shape"] for r in pq.read_table(world / "ground_truth" / "images.parquet").to_pylist()}
    out = {}
    for p in (store_dir / "embeddings" / "metadata").glob("*.parquet"):
        for r in pq.read_table(p, columns=["key", "url"]).to_pylist():
            out[r["key"]] = truth.get(r["url"])
    return out


def test_keep_near_circles_keeps_circles_and_drops_the_rest(run_copy, report_world):
    store_dir = run_copy
    truth = shapes(report_world, store_dir)
    embedded = Counter(truth.values())
    base = embedded["circle"] / len(truth)
    assert embedded["circle"] >= 10 and base < 0.25  # circles are a minority of the run

    circles = store_dir.parent / "circles.txt"
    circles.write_text("".join(f"a {color} circle\n" for color in COLORS))
    proc = refilter(store_dir, "--keep-near", str(circles))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kept = published(store_dir)
    dropped = set(truth) - kept
    in_kept = sum(truth[k] == "circle" for k in kept) / len(kept)
    in_dropped = sum(truth[k] == "circle" for k in dropped) / len(dropped)
    # `shapes` clusters circles with same-coloured hearts and squares (README: the measured shares),
    # so the kept are not all circles; nearly every circle is kept.
    assert in_kept >= 2 * base, (in_kept, base)
    assert in_dropped <= base / 3, (in_dropped, base)
    record = json.loads((store_dir / layout.FILTER_RECORD).read_text())
    near = record["keep_near"]
    assert record["keep_top_percent"] is None and record["published"] == len(kept) == near["near"]
    assert near["embedded"] == len(truth) and near["clusters"] == round(len(truth) ** 0.5)  # the default
    assert near["target_vectors"] == len(COLORS) and 1 <= near["clusters_kept"] <= len(COLORS)
    assert near["targets"] == [f"circles.txt ({len(COLORS)} captions)"]
    assert f"near the targets: {len(kept)} of {len(truth)} embedded samples" in proc.stdout
    card = (store_dir / layout.DATASET_CARD).read_text()
    assert "`clipfleet refilter --keep-near`" in card and f"{len(kept):,} of {len(truth):,} embedded" in card
    assert f"in `dataset/` now: {len(kept):,}." in card

    everything = files(store_dir)
    again = refilter(store_dir, "--keep-near", str(circles))
    assert again.returncode == 0 and "nothing changed" in again.stdout, again.stdout + again.stderr
    assert files(store_dir) == everything  # deterministic clusters: not a byte, not a timestamp

    # What a settled run re-applies (producer/follow.py): the stored vectors, no model, same result.
    from clipfleet.workers.publish.refilter import in_force
    from clipfleet.workers.publish.refilter import refilter as apply
    store = Store(str(store_dir))
    assert not apply(store, **in_force(store, RunConfig.load(store)))["changed"]

    # The same vectors as a .npy file keep the same samples.
    targets = store_dir.parent / "circle.npy"
    shutil.copy(store_dir / layout.FILTER_TARGETS, targets)
    from_file = refilter(store_dir, "--keep-near", str(targets))
    assert from_file.returncode == 0 and "0 shards rewritten" in from_file.stdout, from_file.stdout + from_file.stderr
    assert published(store_dir) == kept

    # With --keep-top-percent: the intersection (DataComp-1B's recipe).
    top = refilter(store_dir, "--keep-top-percent", "50")
    assert top.returncode == 0, top.stderr
    best = published(store_dir)
    both = refilter(store_dir, "--keep-top-percent", "50", "--keep-near", str(circles))
    assert both.returncode == 0, both.stderr
    assert published(store_dir) == best & kept and 0 < len(best & kept) < len(kept)
    record = json.loads((store_dir / layout.FILTER_RECORD).read_text())
    assert record["keep_top_percent"] == 50 and record["keep_near"]["near"] == len(kept)
    card = (store_dir / layout.DATASET_CARD).read_text()
    assert "--keep-top-percent 50.0" in card and "and `clipfleet refilter --keep-near`" in card


def test_keep_near_a_folder_of_circle_pictures(run_copy, report_world, tmp_path):
    """Images as targets, as DataComp's ImageNet images: circles drawn apart from the run's world."""
    import numpy as np
    from clipfleet.sandbox.images import BACKGROUNDS, render
    rng = np.random.default_rng(7)
    folder = tmp_path / "circles"
    folder.mkdir()
    for i in range(12):
        render(str(rng.choice(list(COLORS))), "circle", str(rng.choice(BACKGROUNDS)), 96, 96, rng).save(
            folder / f"{i:02d}.png")
    truth = shapes(report_world, run_copy)
    base = sum(s == "circle" for s in truth.values()) / len(truth)
    proc = refilter(run_copy, "--keep-near", str(folder))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kept = published(run_copy)
    dropped = set(truth) - kept
    assert sum(truth[k] == "circle" for k in kept) / len(kept) > 1.5 * base
    assert sum(truth[k] == "circle" for k in dropped) / len(dropped) < base / 2
    near = json.loads((run_copy / layout.FILTER_RECORD).read_text())["keep_near"]
    assert near["targets"] == ["circles (12 images)"] and near["target_vectors"] == 12


def test_refilter_needs_a_filter_and_targets_of_the_runs_dimension(run_copy, tmp_path):
    import numpy as np
    before = files(run_copy)
    none = refilter(run_copy)
    assert none.returncode != 0 and "--keep-top-percent, --keep-near or both" in none.stderr, none.stderr
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.ones((2, 7), np.float32))
    proc = refilter(run_copy, "--keep-near", str(wrong))
    assert proc.returncode != 0 and "7 dimensions" in proc.stderr, proc.stdout + proc.stderr
    typo = refilter(run_copy, "--keep-near", str(tmp_path / "circels.npy"))
    assert typo.returncode != 0 and "no such file" in typo.stderr, typo.stdout + typo.stderr
    alone = refilter(run_copy, "--keep-top-percent", "30", "--clusters", "5")
    assert alone.returncode != 0 and "--clusters goes with --keep-near" in alone.stderr, alone.stderr
    assert files(run_copy) == before
