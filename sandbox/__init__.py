"""The sandbox: a local synthetic web, real-format WAT files, and a small CLIP trained on it.

Nothing here touches the internet. `clipfleet sandbox make DIR` builds a world,
`clipfleet sandbox serve DIR` serves it on 127.0.0.1, and `clipfleet models eval --model shapes`
checks the shipped model against a fresh sample of the same world.

Contracts (other stages and their tests rely on these exactly)
---------------------------------------------------------------

Directory written by `make DIR [--samples N=1000] [--port P=8471] [--seed S=0] [--wat-files F=3]`
(deterministic for a seed; see sandbox.web.make_sandbox):

    DIR/sandbox.json       {"host", "port", "seed", "samples", "base_url", "wat_files": [names], ...}
    DIR/web/img/{id:06d}.{jpg,png,webp}
    DIR/web/corner/...     files behind the misbehaving corner
    DIR/wat/CC-MAIN-SANDBOX-{n:05d}.warc.wat.gz
    DIR/ground_truth/images.parquet, corner.parquet, pairs.parquet

Image URLs: ``http://127.0.0.1:{port}/img/{id:06d}.{ext}``. The port is fixed at make time and
baked into the WAT pages and the ground truth; `serve DIR` uses it by default (from
sandbox.json). `sandbox.server.SandboxServer(DIR, host="127.0.0.1", port=None)` serves it
in-process: `.start()`, `.stop()`, `.url`, and `with SandboxServer(DIR) as server: ...`.

ground_truth/images.parquet, one row per served image:
    id, url, caption, language, true_color, true_shape, caption_correct (bool),
    watermark (bool), unsafe (bool), width, height, format ("jpeg"|"png"|"webp"),
    sha256, md5 (hashes of the served bytes), background, subject_size (the shape's radius
    over the short side, 0.22-0.36), aesthetic (the aesthetic stand-in, 1-10 from subject_size:
    a subject that fills the frame rates high; see sandbox.images.aesthetic_rating)
  `caption_correct` is False for deliberately wrong captions (both colour and shape wrong)
  and for captions with no language (camera file names such as "IMG_2034.JPG 1/250s").
  `unsafe` marks the stand-in class: the shape sits on black and yellow hazard stripes.
  `watermark` marks a tiled, semi-transparent "© STOCK PROOF" overlay.

ground_truth/corner.parquet, one row per misbehaving path:
    case, url, expected_status ("success"|"failed"), expected_error (a keyword the
    downloader's error should contain: "404", "timeout", "too large", "pixels", "decode",
    "not an image", "redirect", "noai", "private address"; "" on success), note,
    resolve_host, resolve_addr (only for the link-local case: metadata.sandbox.invalid must
    resolve, through the test's own resolver, to 169.254.169.254; "" elsewhere)
  The 500-then-200 and 429-then-200 paths fail on every odd-numbered request (1st, 3rd...)
  and succeed on the others; `SandboxServer.reset_counts()` starts them over.

ground_truth/pairs.parquet, the pairs a correct extractor yields from all WAT files together:
    url, caption, page_url, language (ISO 639-1: en fr de es ru zh ja, or "" for captions
    written with no language), wat_file
  Every image of images.parquet is there with the same caption and language; a few more
  pairs point at other 127.0.0.1 URLs (/photos/... and /corner/... paths, one https URL,
  one 2048-character URL).

Extraction rules the ground truth follows:
  - take Links entries whose path is exactly "IMG@/src" and that have an "alt" key;
  - normalise alt: remove control characters (Unicode category Cc), collapse whitespace runs
    to one space, strip; keep alt of at least 5 characters; truncate at 2000 characters;
  - resolve the URL against Head.Base if present, else the page URL
    (Envelope.WARC-Header-Metadata.WARC-Target-URI);
  - keep http and https only; drop data:, javascript:, paths ending in .svg or .gif (any
    case, ignoring query and fragment), and URLs longer than 2048 characters;
  - deduplicate by URL across all WAT files in file-name order and record order: the first
    occurrence wins (its caption and page_url);
  - malformed records (broken JSON, a missing Envelope, Payload-Metadata or
    WARC-Header-Metadata, bytes that are not UTF-8) yield nothing.

Captions are written in seven languages (sandbox.images.LANGUAGES) with enough words for
fastText lid.176 to recognise them. true_color is one of red orange yellow green blue purple
pink brown; true_shape one of circle square triangle star heart cross.

Models (shared.models): `load_clip("shapes")` -> (model, preprocess, tokenizer), an open_clip
CLIP with 128-d embeddings, 64 px input and a 128-token context; `load_tag_heads("shapes")`
-> {"watermark": head, "unsafe": head}, each head(L2-normalised image embeddings (n, 128))
-> probabilities (n,). Files in shared/models/shapes/; rebuilt by
`python -m sandbox.train_shapes --out shared/models/shapes`; checked by
`clipfleet models eval --model shapes`. With `shapes`, right captions score about 0.9 and
wrong ones about 0.1; a threshold between 0.6 and 0.7 separates them (metrics.json records
suggested_min_similarity). The 0.28 default is calibrated for real ViT-B/32, not for shapes.
"""
