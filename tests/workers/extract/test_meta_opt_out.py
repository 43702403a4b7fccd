"""Pages that opt out of AI use with a robots meta: their images are dropped at extract time,
counted under their own reason, so they are never downloaded."""
from __future__ import annotations

from collections import Counter

import pytest

from clipfleet.sandbox.consent import PAGE_METAS
from clipfleet.sandbox.wat import Page, write_wat
from clipfleet.shared.runconfig import RunConfig
from clipfleet.workers.extract.rules import extract_pairs, meta_opt_out


def page(n: int, metas: list[dict] | None = None) -> Page:
    return Page(url=f"http://site{n}.example/page.html", metas=metas or [],
                links=[{"path": "IMG@/src", "url": f"/img/{n}-{k}.jpg", "alt": f"a picture number {n} {k}"}
                       for k in range(3)] + [{"path": "A@/href", "url": "/about"}])


@pytest.mark.parametrize("metas, opted_out", [
    ([{"name": "robots", "content": "noai"}], True),
    ([{"name": "robots", "content": "noindex, NoImageAI"}], True),
    ([{"name": "ROBOTS", "content": "noai,noimageai"}], True),
    ([{"name": "CCBot", "content": "noai"}], True),       # the crawler the WAT came from
    ([{"name": "clipfleet", "content": "noimageai"}], True),
    ([{"name": "robots", "content": "noindex, nofollow"}], False),
    ([{"name": "otherbot", "content": "noai"}], False),
    ([{"name": "description", "content": "noai art"}], False),
    ([{"property": "og:image", "content": "x"}, "not a dict", {"name": None}], False),
])
def test_meta_opt_out(metas, opted_out):
    assert (meta_opt_out(metas) is not None) is opted_out


def test_a_wat_pages_noai_meta_drops_its_images_with_their_own_reason(tmp_path):
    pages = [page(0), page(1, [{"name": "robots", "content": "noai, noimageai"}]), page(2),
             page(3, [{"name": "robots", "content": "noimageai"}]), page(4, [{"name": "robots", "content": "noindex"}])]
    wat = tmp_path / "opt-out.warc.wat.gz"
    write_wat(wat, pages, source_warc="opt-out.warc.gz", seed=1)
    stats = Counter()
    with open(wat, "rb") as source:
        pairs = list(extract_pairs(source, RunConfig.make(store="unused").extract, stats))
    assert {page_url for _, _, page_url in pairs} == {pages[i].url for i in (0, 2, 4)}
    assert len(pairs) == 9
    assert stats["drop_meta_robots_opt_out"] == 6
    assert stats["img_links"] == 15  # every image link is counted, the dropped ones too


@pytest.mark.parametrize("honoured", [True, False])
def test_tdmrep_page_metas_reserve_a_pages_images_unless_respect_leaves_them_out(tmp_path, honoured):
    pages = [page(n, metas) for n, (_, metas, _) in enumerate(PAGE_METAS)]
    wat = tmp_path / "tdm.warc.wat.gz"
    write_wat(wat, pages, source_warc="tdm.warc.gz", seed=2)
    stats = Counter()
    with open(wat, "rb") as source:
        pairs = list(extract_pairs(source, RunConfig.make(store="unused").extract, stats, metas=honoured))
    kept = {pages[n].url for n, (_, _, keeps) in enumerate(PAGE_METAS) if keeps or not honoured}
    assert {page_url for _, _, page_url in pairs} == kept
    assert stats["drop_meta_tdm_reservation"] == (3 if honoured else 0)
    assert stats["drop_meta_robots_opt_out"] == (3 if honoured else 0)
