"""`clipfleet sandbox make DIR`: build a sandbox world, deterministic for a seed.

DIR/web/img/{id:06d}.{jpg,png,webp}   the captioned images the server serves
DIR/web/corner/...                      files behind the misbehaving corner
DIR/wat/CC-MAIN-SANDBOX-{n:05d}.warc.wat.gz  pages that point at them
DIR/ground_truth/{images,corner,pairs}.parquet
DIR/sandbox.json                        port, seed, samples, WAT file names

The ground truth for pairs is written from what each link was generated to be, following
the extraction rules in sandbox/__init__.py, not by parsing the WAT files back.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipfleet.sandbox import images
from clipfleet.sandbox.server import CORNER_BOMB_IMAGE, CORNER_CASES, CORNER_OK_IMAGE, CORNER_TRUNCATED_IMAGE
from clipfleet.sandbox.wat import BAD_BYTES_MARK, MALFORMED_KINDS, Page, write_wat

HOST = "127.0.0.1"
DEFAULT_PORT = 8471
DEFAULT_SAMPLES = 1000
DEFAULT_SEED = 0
DEFAULT_WAT_FILES = 3

# Shares of the world; "" is a caption with no language (a camera file name).
LANGUAGE_WEIGHTS = {"en": 0.45, "fr": 0.085, "de": 0.085, "es": 0.085, "ru": 0.085,
                    "zh": 0.085, "ja": 0.085, "": 0.04}
WRONG_CAPTION_SHARE = 0.15
WATERMARK_SHARE = 0.15
UNSAFE_SHARE = 0.10
FORMAT_WEIGHTS = {"jpeg": 0.8, "png": 0.1, "webp": 0.1}
EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}
IMAGES_PER_PAGE = 8
MAX_URL_LENGTH = 2048
MAX_ALT_LENGTH = 2000

# Alt texts long enough to keep, on links the rules drop for their URL.
_FILLER_ALTS = ["company logo in the page header", "share this article with your friends",
                "an advertisement banner for the summer sale", "photo of our friendly team",
                "ein Banner für den Sommerschlussverkauf", "logo de l'entreprise en haut de page"]
_SHORT_ALTS = ["logo", " ab ", "\x07icon\x07", "  pic\n", "1234", "DSC1"]


@dataclass
class ImageSpec:
    id: int
    color: str
    shape: str
    background: str
    language: str
    caption: str
    caption_correct: bool
    watermark: bool
    unsafe: bool
    width: int
    height: int
    format: str


def image_url(port: int, image_id: int, fmt: str) -> str:
    return f"http://{HOST}:{port}/img/{image_id:06d}.{EXTENSIONS[fmt]}"


def _pick(rng: np.random.Generator, weights: dict):
    keys = list(weights)
    return keys[int(rng.choice(len(keys), p=np.array(list(weights.values())) / sum(weights.values())))]


def web_size(rng: np.random.Generator) -> tuple[int, int]:
    """Sizes like images on the web: mostly a few hundred pixels, from 150 to 1200."""
    width = float(np.clip(np.exp(rng.normal(math.log(420), 0.5)), 150, 1200))
    aspect = float(rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9, 3 / 4, 2 / 3]))
    return int(width), int(np.clip(width / aspect, 150, 1200))


def image_spec(image_id: int, rng: np.random.Generator, wrong_caption_share: float = WRONG_CAPTION_SHARE,
               aspects: tuple[float, float] | None = None) -> ImageSpec:
    color = str(rng.choice(list(images.COLORS)))
    shape = str(rng.choice(images.SHAPES))
    unsafe = bool(rng.random() < UNSAFE_SHARE)
    background = images.UNSAFE_BACKGROUND if unsafe else str(rng.choice(images.BACKGROUNDS))
    watermark = bool(rng.random() < WATERMARK_SHARE)
    language = _pick(rng, LANGUAGE_WEIGHTS)
    template = int(rng.integers(images.TEMPLATE_COUNT))
    if language == "":
        text, correct = images.camera_caption(rng), False
    elif rng.random() < wrong_caption_share:
        # A wrong caption gets both the colour and the shape wrong, so it is plainly wrong.
        wrong_color = str(rng.choice([c for c in images.COLORS if c != color]))
        wrong_shape = str(rng.choice([s for s in images.SHAPES if s != shape]))
        text, correct = images.caption(wrong_color, wrong_shape, background, language, template), False
    else:
        text, correct = images.caption(color, shape, background, language, template), True
    width, height = web_size(rng) if aspects is None else images.aspect_size(rng, aspects)
    return ImageSpec(image_id, color, shape, background, language, text, correct, watermark,
                     unsafe, width, height, _pick(rng, FORMAT_WEIGHTS))


def _write_images(web_dir: Path, specs_rngs, port: int) -> list[dict]:
    rows = []
    (web_dir / "img").mkdir(parents=True, exist_ok=True)
    for spec, rng in specs_rngs:
        details = {}
        picture = images.render(spec.color, spec.shape, spec.background, spec.width,
                                spec.height, rng, watermark=spec.watermark, details=details)
        data = images.encode(picture, spec.format, rng)
        (web_dir / "img" / f"{spec.id:06d}.{EXTENSIONS[spec.format]}").write_bytes(data)
        rows.append({**spec.__dict__, **details, "url": image_url(port, spec.id, spec.format),
                     "sha256": hashlib.sha256(data).hexdigest(),
                     "md5": hashlib.md5(data).hexdigest()})
    return rows


# ----------------------------------------------------------------------------- the corner


def decompression_bomb_png(side: int = 20000) -> bytes:
    """A PNG of side x side black pixels (1 bit each) that compresses to a few dozen KB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (side + 7) // 8)  # filter byte 0, then the packed pixels
    compressor = zlib.compressobj(9)
    pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels)
            + chunk(b"IEND", b""))


CORNER_IMAGE_CAPTION = images.caption("blue", "star", "stripes", "en")


def _write_corner_files(web_dir: Path, seed: int) -> None:
    rng = np.random.default_rng([seed, 1_000_000_000])
    (web_dir / "corner").mkdir(parents=True, exist_ok=True)
    ok = images.render("blue", "star", "stripes", 480, 360, rng)
    (web_dir / CORNER_OK_IMAGE).write_bytes(images.encode(ok, "jpeg", rng))
    whole = images.encode(images.render("green", "heart", "dots", 640, 480, rng), "jpeg", rng)
    (web_dir / CORNER_TRUNCATED_IMAGE).write_bytes(whole[: int(len(whole) * 0.6)])
    (web_dir / CORNER_BOMB_IMAGE).write_bytes(decompression_bomb_png())


def _corner_rows(port: int) -> list[dict]:
    return [{"case": c.case, "url": f"http://{HOST}:{port}{c.path}",
             "expected_status": c.expected_status, "expected_error": c.expected_error,
             "note": c.note, "resolve_host": c.resolve_host, "resolve_addr": c.resolve_addr}
            for c in CORNER_CASES]


# ----------------------------------------------------------------------------- pages

Expected = tuple[str, str, str]  # (absolute url, caption, language) a link must yield


@dataclass
class _PlannedPage:
    url: str
    base: str | None = None
    links: list[tuple[dict, Expected | None]] = field(default_factory=list)
    malformed: str = ""
    html: bool = True

    def to_wat_page(self, index: int) -> Page:
        return Page(url=self.url, links=[entry for entry, _ in self.links], base=self.base,
                    title=f"Sandbox gallery {index}", malformed=self.malformed, html=self.html)


def _messy(text: str, rng: random.Random) -> str:
    """The same caption as an HTML alt might carry it: normalising gives `text` back.

    Control characters that are not whitespace may go anywhere (removing them restores
    the text); whitespace ones only beside a space, so the order of the normalisation
    steps does not matter.
    """
    chars = list(text)
    for _ in range(rng.randint(1, 2)):
        chars.insert(rng.randint(0, len(chars)), rng.choice(["\x07", "\x1b", "\x7f", "\x00"]))
    spaced = "".join(chars)
    if " " in spaced:
        spaced = spaced.replace(" ", rng.choice(["  ", " \n ", " \t\t ", " \r\n "]), 1)
    return rng.choice(["\n  ", "\t", " ", ""]) + spaced + rng.choice(["  \n", " \t", "\r\n", " "])


def _relative_path(target_path: str, base_url: str) -> str:
    """`target_path` written relative to the directory of `base_url`'s path."""
    base_parts = (urlsplit(base_url).path or "/").split("/")[1:-1]  # the directories, without the file name
    target_parts = target_path.split("/")[1:]
    common = 0
    while (common < len(base_parts) and common < len(target_parts) - 1
           and base_parts[common] == target_parts[common]):
        common += 1
    return "/".join([".."] * (len(base_parts) - common) + target_parts[common:])


class _WorldPlanner:
    """Lays images and noise out on pages so that every rule has cases to test."""

    def __init__(self, specs: list[ImageSpec], port: int, seed: int, wat_files: int):
        self.specs = specs
        self.port = port
        self.root = f"http://{HOST}:{port}"
        self.rng = random.Random(seed)
        self.wat_files = wat_files
        self.unique = 0  # numbers junk URLs so none repeats

    def _next(self) -> int:
        self.unique += 1
        return self.unique

    def _img(self, url: str, alt: str | None) -> dict:
        entry = {"path": "IMG@/src", "url": url}
        if alt is not None:
            entry["alt"] = alt
        return entry

    def _written_url(self, absolute: str, page: _PlannedPage) -> str:
        """The image URL as a page might write it: absolute, root- or page-relative."""
        path = absolute[len(self.root):]
        form = self.rng.choices(["absolute", "root", "relative", "scheme"], [50, 20, 20, 10])[0]
        if form == "root":
            return path
        if form == "relative":
            return _relative_path(path, page.base or page.url)
        if form == "scheme":
            return "//" + absolute.split("//", 1)[1]
        return absolute

    def _image_link(self, spec: ImageSpec, page: _PlannedPage, text: str, language: str):
        absolute = image_url(self.port, spec.id, spec.format)
        alt = _messy(text, self.rng) if self.rng.random() < 0.25 else text
        return self._img(self._written_url(absolute, page), alt), (absolute, text, language)

    def _other_caption(self, spec: ImageSpec) -> tuple[str, str]:
        """Another alt for an image seen before: it must lose to the first one."""
        language = self.rng.choice(images.LANGUAGES)
        text = images.caption(spec.color, spec.shape, spec.background, language,
                              self.rng.randrange(images.TEMPLATE_COUNT))
        return text, language

    def _noise(self) -> tuple[dict, None]:
        """A link a correct extractor drops."""
        k = self._next()
        good_alt = self.rng.choice(_FILLER_ALTS)
        kind = self.rng.randrange(11)
        if kind == 0:
            return self._img(f"/static/spacer-{k}.png", None), None
        if kind == 1:
            return self._img(f"/static/blank-{k}.png", ""), None
        if kind == 2:
            return self._img(f"/static/small-{k}.jpg", self.rng.choice(_SHORT_ALTS)), None
        if kind == 3:
            return self._img("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAf"
                             "FcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==", good_alt), None
        if kind == 4:
            return self._img("javascript:void(0)", good_alt), None
        if kind == 5:
            return self._img(self.rng.choice([f"/static/logo-{k}.svg", f"/static/icon-{k}.SVG?v=2"]),
                             good_alt), None
        if kind == 6:
            return self._img(self.rng.choice([f"/static/anim-{k}.gif",
                                              f"{self.root}/static/spinner-{k}.GIF#top"]), good_alt), None
        if kind == 7:
            return self._img(f"ftp://{HOST}/pub/photo-{k}.jpg", good_alt), None
        if kind == 8:
            return {"path": "IMG@/data-src", "url": f"/static/lazy-{k}.jpg", "alt": good_alt}, None
        if kind == 9:
            return {"path": "A@/href", "url": f"/pages/site-{k % 7}/page-{k:05d}.html",
                    "text": "read more about this"}, None
        return {"path": "IMG@/src", "url": f"/static/no-alt-{k}.jpg", "title": good_alt}, None

    def _page(self, index: int) -> _PlannedPage:
        page = _PlannedPage(url=f"{self.root}/pages/site-{index % 7}/page-{index:05d}.html")
        if self.rng.random() < 0.3:
            page.base = self.rng.choice([f"{self.root}/", f"{self.root}/img/", f"{self.root}/pages/"])
        return page

    def plan(self) -> list[list[_PlannedPage]]:
        """Pages for each WAT file, in file order and record order."""
        order = list(range(len(self.specs)))
        self.rng.shuffle(order)
        page_count = max(self.wat_files, math.ceil(len(self.specs) / IMAGES_PER_PAGE))
        pages = [self._page(i) for i in range(page_count)]
        seen: list[ImageSpec] = []  # images whose first link is on an earlier page
        for index, page in enumerate(pages):
            own = [self.specs[i] for i in order[index::page_count]]
            links = [self._image_link(s, page, s.caption, s.language) for s in own]
            for spec in self.rng.sample(seen, min(len(seen), self.rng.choice([0, 0, 1, 2]))):
                links.append(self._image_link(spec, page, *self._other_caption(spec)))
            links += [self._noise() for _ in range(self.rng.randint(2, 5))]
            self.rng.shuffle(links)  # duplicates refer to earlier pages, so order is free here
            if own and self.rng.random() < 0.1:  # the same image twice on one page
                links.append(self._image_link(own[0], page, *self._other_caption(own[0])))
            page.links = links
            seen += own
        self._sprinkle(pages, self._extra_links())
        per_file = [pages[f * page_count // self.wat_files:(f + 1) * page_count // self.wat_files]
                    for f in range(self.wat_files)]
        for file_pages in per_file:
            self._add_odd_records(file_pages)
        return per_file

    def _sprinkle(self, pages: list[_PlannedPage], links) -> None:
        for link in links:
            page = self.rng.choice(pages)
            page.links.insert(self.rng.randint(0, len(page.links)), link)

    def _extra_links(self) -> list:
        """One-off cases: no-language captions, length limits, https, the corner."""
        links = []
        for _ in range(max(3, len(self.specs) // 200)):
            url = f"{self.root}/photos/photo-{self._next():05d}.jpg"
            text = images.camera_caption(np.random.default_rng(self.rng.getrandbits(32)))
            links.append((self._img(url, text), (url, text, "")))
        links.append((self._img(f"{self.root}/photos/five.jpg", "DSC01"),
                      (f"{self.root}/photos/five.jpg", "DSC01", "")))
        links.append((self._img(f"{self.root}/photos/four.jpg", "DSC1"), None))
        long_text = self._long_alt()
        links.append((self._img(f"{self.root}/photos/long-alt.jpg", long_text),
                      (f"{self.root}/photos/long-alt.jpg", long_text[:MAX_ALT_LENGTH], "en")))
        if self.specs:
            spec = self.specs[0]
            at_limit = self._padded_url(image_url(self.port, spec.id, spec.format), MAX_URL_LENGTH)
            links.append((self._img(at_limit, spec.caption), (at_limit, spec.caption, spec.language)))
            too_long = self._padded_url(image_url(self.port, spec.id, spec.format), MAX_URL_LENGTH + 1)
            links.append((self._img(too_long, spec.caption), None))
            https = image_url(self.port, spec.id, spec.format).replace("http://", "https://")
            links.append((self._img(https, spec.caption), (https, spec.caption, spec.language)))
        for case in CORNER_CASES:
            url = f"{self.root}{case.path}"
            links.append((self._img(url, CORNER_IMAGE_CAPTION), (url, CORNER_IMAGE_CAPTION, "en")))
        return links

    def _long_alt(self) -> str:
        """An English alt over MAX_ALT_LENGTH whose cut does not fall on a space."""
        text = " ".join(images.caption(c, s, "plain", "en", template=1) + "."
                        for c in images.COLORS for s in images.SHAPES)
        while text[MAX_ALT_LENGTH - 1] == " ":
            text = "A " + text
        assert len(text) > MAX_ALT_LENGTH + 100
        return text

    @staticmethod
    def _padded_url(url: str, length: int) -> str:
        prefix = url + "?ref="
        return prefix + "a" * (length - len(prefix))

    def _add_odd_records(self, file_pages: list[_PlannedPage]) -> None:
        """Malformed records and a non-HTML response, at random places in one file."""
        odd = [_PlannedPage(url=f"{self.root}/robots.txt", html=False)]
        for kind in MALFORMED_KINDS:
            k = self._next()
            page = _PlannedPage(url=f"{self.root}/pages/broken/page-{k:05d}.html", malformed=kind)
            alt = self.rng.choice(_FILLER_ALTS)
            if kind == "non_utf8":
                alt = f"{alt} {BAD_BYTES_MARK}"
            page.links = [(self._img(f"{self.root}/static/malformed-{k}.jpg", alt), None),
                          (self._img(f"/static/malformed-{k}-b.jpg", "a red circle on a plain background"),
                           None)]
            odd.append(page)
        for page in odd:
            file_pages.insert(self.rng.randint(0, len(file_pages)), page)


def expected_pairs(per_file: list[list[_PlannedPage]], wat_names: list[str]) -> list[dict]:
    """The pairs a correct extractor yields: first occurrence by URL, in file and record order."""
    pairs, seen = [], set()
    for wat_name, pages in sorted(zip(wat_names, per_file)):
        for page in pages:
            for _, expected in page.links:
                if expected is None or expected[0] in seen:
                    continue
                url, caption, language = expected
                seen.add(url)
                pairs.append({"url": url, "caption": caption, "page_url": page.url,
                              "language": language, "wat_file": wat_name})
    return pairs


# ----------------------------------------------------------------------------- make


def wat_file_name(index: int) -> str:
    return f"CC-MAIN-SANDBOX-{index:05d}.warc.wat.gz"


_IMAGES_SCHEMA = pa.schema([
    ("id", pa.int64()), ("url", pa.string()), ("caption", pa.string()), ("language", pa.string()),
    ("true_color", pa.string()), ("true_shape", pa.string()), ("caption_correct", pa.bool_()),
    ("watermark", pa.bool_()), ("unsafe", pa.bool_()), ("width", pa.int64()),
    ("height", pa.int64()), ("format", pa.string()), ("sha256", pa.string()), ("md5", pa.string()),
    ("background", pa.string()), ("subject_size", pa.float32()), ("aesthetic", pa.float32()),
])
_CORNER_SCHEMA = pa.schema([(name, pa.string()) for name in (
    "case", "url", "expected_status", "expected_error", "note", "resolve_host", "resolve_addr")])
_PAIRS_SCHEMA = pa.schema([(name, pa.string()) for name in (
    "url", "caption", "page_url", "language", "wat_file")])


def _write_parquet(path: Path, rows: list[dict], schema: pa.Schema) -> None:
    columns = {name: [row[name] for row in rows] for name in schema.names}
    pq.write_table(pa.table(columns, schema=schema), path)


def _prepare(directory: Path) -> None:
    """Start from an empty world; refuse to clear a directory that is not a sandbox."""
    if directory.exists() and any(directory.iterdir()):
        if not (directory / "sandbox.json").is_file():
            raise FileExistsError(f"{directory} is not empty and holds no sandbox.json; "
                                  f"refusing to write a sandbox into it")
        for part in ("web", "wat", "ground_truth", "sandbox.json"):
            target = directory / part
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    directory.mkdir(parents=True, exist_ok=True)


def make_sandbox(directory: str | Path, samples: int = DEFAULT_SAMPLES, port: int = DEFAULT_PORT,
                 seed: int = DEFAULT_SEED, wat_files: int = DEFAULT_WAT_FILES,
                 wrong_caption_share: float = WRONG_CAPTION_SHARE,
                 aspects: tuple[float, float] | None = None) -> dict:
    """Build a sandbox world in `directory`; returns the settings written to sandbox.json.

    `aspects` (low, high) draws every image's width/height from that range instead of the web's
    usual few ratios; `wrong_caption_share` is the share of captions wrong in colour and shape."""
    if samples < 1 or wat_files < 1:
        raise ValueError("samples and wat_files must be at least 1")
    if not 0 <= wrong_caption_share <= 1:
        raise ValueError("wrong_caption_share must be between 0 and 1")
    if aspects is not None and not 0 < aspects[0] <= aspects[1]:
        raise ValueError("aspects must be (low, high) with 0 < low <= high")
    directory = Path(directory)
    _prepare(directory)
    web_dir = directory / "web"
    specs_rngs = []
    for image_id in range(samples):
        rng = np.random.default_rng([seed, image_id])  # one stream per image: order-free
        specs_rngs.append((image_spec(image_id, rng, wrong_caption_share, aspects), rng))
    specs = [spec for spec, _ in specs_rngs]
    image_rows = _write_images(web_dir, specs_rngs, port)
    for row in image_rows:
        row["true_color"], row["true_shape"] = row.pop("color"), row.pop("shape")
    _write_corner_files(web_dir, seed)

    per_file = _WorldPlanner(specs, port, seed, wat_files).plan()
    wat_names = [wat_file_name(i) for i in range(wat_files)]
    (directory / "wat").mkdir()
    for index, (name, pages) in enumerate(zip(wat_names, per_file)):
        wat_pages = [page.to_wat_page(n) for n, page in enumerate(pages)]
        write_wat(directory / "wat" / name, wat_pages, name.replace(".warc.wat.gz", ".warc.gz"),
                  seed=seed * 1000 + index)
    pairs = expected_pairs(per_file, wat_names)
    _check_first_captions(pairs, specs, port)

    truth = directory / "ground_truth"
    truth.mkdir()
    _write_parquet(truth / "images.parquet", image_rows, _IMAGES_SCHEMA)
    _write_parquet(truth / "corner.parquet", _corner_rows(port), _CORNER_SCHEMA)
    _write_parquet(truth / "pairs.parquet", pairs, _PAIRS_SCHEMA)
    settings = {"host": HOST, "port": port, "seed": seed, "samples": samples,
                "base_url": f"http://{HOST}:{port}", "wat_files": wat_names,
                "pairs": len(pairs), "corner_cases": len(CORNER_CASES),
                "wrong_caption_share": wrong_caption_share,
                "aspect_ratios": list(aspects) if aspects is not None else None}
    (directory / "sandbox.json").write_text(json.dumps(settings, indent=2) + "\n")
    return settings


def _check_first_captions(pairs: list[dict], specs: list[ImageSpec], port: int) -> None:
    """Each image's first pair carries its images.parquet caption, so the two files agree."""
    by_url = {pair["url"]: pair for pair in pairs}
    for spec in specs:
        pair = by_url[image_url(port, spec.id, spec.format)]
        assert (pair["caption"], pair["language"]) == (spec.caption, spec.language), spec.id
