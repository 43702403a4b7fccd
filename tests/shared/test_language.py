"""Language ID of captions (shared/language.py): lid.176 into LAION's three buckets."""
from __future__ import annotations

import pytest

from clipfleet.shared.language import LanguageTagger, language_bucket, language_text


def test_language_text_keeps_letters_only():
    assert language_text("IMG_0566.JPG 1/125s") == "img jpg s"
    assert language_text("DSC01") == "dsc"
    assert language_text("12345 / 678") == ""
    assert language_text("Un CARRÉ bleu") == "un carré bleu"


@pytest.mark.parametrize("caption, bucket", [
    ("a photo of a red circle on a striped background", "en"),
    ("une photo d'un carré bleu sur un fond rayé", "other"),
    ("ein grüner Stern auf einem gepunkteten Hintergrund", "other"),
    ("красный круг на полосатом фоне", "other"),
    ("縞模様の背景に赤い丸", "other"),
    ("DSC00231.jpg", "none"),
    ("2019_0312_001234", "none"),
])
def test_language_buckets(caption, bucket):
    code, score = LanguageTagger(min_score=0.3).tag(caption)
    assert language_bucket(code) == bucket
    assert 0.0 <= score <= 1.0


def test_no_language_keeps_the_score():
    tagger = LanguageTagger(min_score=1.01)  # nothing reaches it
    code, score = tagger.tag("a photo of a red circle on a striped background")
    assert code == "" and score > 0


def test_language_text_shortcut_keeps_its_meaning():
    """Letters and spaces skip the regex; every other character must still go through it."""
    import re
    not_letters = re.compile(r"[\W\d_]+")
    for code in range(0x110000):
        if not 0xd800 <= code < 0xe000:
            caption = f"Ab {chr(code)}c"
            assert language_text(caption) == " ".join(not_letters.sub(" ", caption).split()).lower(), hex(code)


def test_language_is_predicted_once_per_text():
    tagger = LanguageTagger(min_score=0.3)
    first = tagger.tag("IMG_0566.JPG")
    assert first == LanguageTagger(0.3).tag("IMG_0566.JPG")

    class NoModel:
        def predict(self, text):
            raise AssertionError(f"predicted {text!r} again")

    tagger._model = NoModel()
    assert tagger.tag("IMG_0567.JPG") == first  # another caption, the same text: "img jpg"




# Chinese without kana, several of which lid.176's lite model calls Japanese on its own
CHINESE = ["傍晚时分一辆红色自行车靠在一面旧砖墙上", "山水画", "漢字", "一只白色的猫坐在窗台上", "北京故宫博物院",
           "红色的圆在条纹背景上", "一張木桌上放著一杯咖啡", "iPhone 保护壳 红色"]
JAPANESE = ["縞模様の背景に赤い丸", "日本語のテキスト", "カメラ", "赤い自転車が古いレンガの壁に立てかけてある"]


def test_han_characters_without_kana_are_not_japanese():
    tagger = LanguageTagger(min_score=0.3)
    tags = {caption: tagger.tag(caption) for caption in CHINESE}
    assert {caption: code for caption, (code, _) in tags.items()} == {caption: "zh" for caption in CHINESE}
    assert all(0.3 <= score <= 1.0 for _, score in tags.values())
    # the model alone says ja for some of them: the rule is what makes these zh
    raw = [tagger._model.predict(language_text(caption))[0][0] for caption in CHINESE]
    assert raw.count("__label__ja") >= 3


def test_kana_is_japanese():
    tagger = LanguageTagger(min_score=0.3)
    assert {caption: tagger.tag(caption)[0] for caption in JAPANESE} == {caption: "ja" for caption in JAPANESE}
    assert tagger._model.predict(language_text(JAPANESE[0]))[0][0] == "__label__zh"  # the model alone


def test_sandbox_chinese_and_japanese_captions():
    """Every zh and ja caption the sandbox writes gets its language (the model alone: 568 of 576 zh)."""
    import itertools
    from clipfleet.sandbox import images
    tagger = LanguageTagger(min_score=0.3)
    for language in ("zh", "ja"):
        codes = {tagger.tag(images.caption(color, shape, background, language, template))[0]
                 for color, shape in itertools.product(images.COLORS, images.SHAPES)
                 for background in [None, *list(images.BACKGROUNDS)[:3]]
                 for template in range(images.TEMPLATE_COUNT)}
        assert codes == {language}
