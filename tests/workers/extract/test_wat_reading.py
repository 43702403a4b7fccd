"""Reading WAT files that are cut off, not UTF-8, not gzip, or not WARC at all: counted, never a crash."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from clipfleet.shared.pipeline import TransientError
from clipfleet.shared.runconfig import RunConfig
from clipfleet.workers.extract.rules import extract_pairs
from clipfleet.workers.extract.wat import NoWarcRecords, iter_record_payloads, open_wat
from tests.workers.extract.watfile import img, response_record, write_wat

CFG = RunConfig.make(store="unused").extract


def pages(n: int) -> list[dict]:
    return [response_record(f"http://example.org/p{i}.html", [img(f"/img/{i}.jpg", f"picture number {i}")])
            for i in range(n)]


def read_pairs(path) -> tuple[list, Counter]:
    stats = Counter()
    with open_wat(str(path)) as source:
        return list(extract_pairs(source, CFG, stats)), stats


@pytest.mark.parametrize("compress", [True, False])
def test_reads_gzip_and_plain_wat(tmp_path, compress):
    path = tmp_path / "a.wat"
    write_wat(path, pages(20), compress=compress)
    pairs, stats = read_pairs(path)
    assert [p[0] for p in pairs] == [f"http://example.org/img/{i}.jpg" for i in range(20)]
    assert stats["records"] == 20 and "truncated_gzip" not in stats


def test_records_without_images_are_not_parsed(tmp_path):
    path = tmp_path / "a.wat.gz"
    write_wat(path, [b"{not json, no image links"] + pages(2))
    pairs, stats = read_pairs(path)
    assert len(pairs) == 2 and stats["records"] == 3 and "malformed_json" not in stats


def test_truncated_gzip_tail_keeps_whole_records(tmp_path):
    path = tmp_path / "a.wat.gz"
    write_wat(path, pages(50))
    data = path.read_bytes()
    cut = tmp_path / "cut.wat.gz"
    cut.write_bytes(data[: len(data) - 40])  # inside the last record's gzip member
    pairs, stats = read_pairs(cut)
    assert stats["truncated_gzip"] == 1
    assert 0 < len(pairs) <= 50
    assert pairs == [(f"http://example.org/img/{i}.jpg", f"picture number {i}", f"http://example.org/p{i}.html")
                     for i in range(len(pairs))]


@pytest.mark.parametrize("keep", [0.3, 0.5, 0.77])
def test_cut_anywhere_never_crashes(tmp_path, keep):
    path = tmp_path / "a.wat.gz"
    write_wat(path, pages(50))
    data = path.read_bytes()
    cut = tmp_path / "cut.wat.gz"
    cut.write_bytes(data[: int(len(data) * keep)])
    pairs, stats = read_pairs(cut)
    assert stats["truncated_gzip"] == 1
    assert len(pairs) < 50
    assert all(url == f"http://example.org/img/{i}.jpg" for i, (url, _, _) in enumerate(pairs))


def test_non_utf8_record_is_skipped(tmp_path):
    bad = json.dumps(response_record("http://example.org/x.html", [img("/x.jpg", "bad bytes MARK here")]))
    path = tmp_path / "a.wat.gz"
    write_wat(path, pages(2) + [bad.encode().replace(b"MARK", b"\xff\xfe\xc3(")] + pages(1))
    pairs, stats = read_pairs(path)
    assert len(pairs) == 3 and stats["non_utf8_record"] == 1


@pytest.mark.parametrize("content", [b"", b"this is not a WARC file at all\n" * 100,
                                     b"\x1f\x8b\x08\x00garbage that is not deflate" * 10])
def test_files_that_are_not_wat_raise_no_warc_records(tmp_path, content):
    path = tmp_path / "junk.wat.gz"
    path.write_bytes(content)
    with pytest.raises(NoWarcRecords, match="no WARC record could be read") as caught:
        read_pairs(path)
    assert ("empty" if not content else f"{len(content)} bytes") in str(caught.value)


@pytest.mark.parametrize("compress", [True, False])
def test_an_excerpt_with_lf_line_ends_is_read_as_the_wat_it_is(tmp_path, compress):
    """An excerpt copied through a text tool: every CRLF of the WARC framing became LF."""
    import gzip
    plain = tmp_path / "a.wat"
    write_wat(plain, pages(20), compress=False)
    data = plain.read_bytes()
    assert data.count(b"\r\n") > 100
    lf = data.replace(b"\r\n", b"\n")
    path = tmp_path / ("lf.wat.gz" if compress else "lf.wat")
    path.write_bytes(gzip.compress(lf) if compress else lf)
    pairs, stats = read_pairs(path)
    assert pairs == read_pairs(plain)[0] and len(pairs) == 20
    assert stats["records"] == 20 and "unreadable_tail" not in stats


def test_a_failing_source_is_transient():
    class Broken:
        def __init__(self):
            self.calls = 0

        def read(self, size=-1):
            raise ConnectionResetError("peer went away")

    with pytest.raises(TransientError):
        list(iter_record_payloads(Broken(), Counter()))


def test_missing_local_wat_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        with open_wat(str(tmp_path / "missing.wat.gz")):
            pass


def test_a_time_limit_inside_the_reader_is_not_swallowed(tmp_path):
    """Only bad data is counted and skipped; a soft time limit must still end the task."""
    from celery.exceptions import SoftTimeLimitExceeded
    path = tmp_path / "a.wat.gz"
    write_wat(path, pages(5))

    class LimitedSource:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def read(self, size=-1):
            raise SoftTimeLimitExceeded()

    with open(path, "rb") as f, pytest.raises(SoftTimeLimitExceeded):
        list(iter_record_payloads(LimitedSource(f), Counter()))
