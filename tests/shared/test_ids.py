"""Ids every side computes the same way (shared/ids.py)."""
from __future__ import annotations

import pyarrow as pa

from clipfleet.shared.ids import pair_uid, pair_uids


def test_uids_are_stable_and_compact():
    assert pair_uid("http://a/b.jpg", "x") == pair_uid("http://a/b.jpg", "x")
    assert pair_uid("http://a/b.jpg", "x") != pair_uid("http://a/b.jpg", "y")
    assert len(pair_uid("http://a/b.jpg", "x")) == 32


def test_batch_uids_match_the_single_ones():
    urls = ["http://example.org/a.jpg", "http://example.org/é.jpg", "http://example.org/😀"]
    captions = ["a", "b c", "日本"]
    assert pair_uids(pa.array(urls), pa.array(captions)).to_pylist() == [pair_uid(u, c) for u, c in zip(urls, captions)]
