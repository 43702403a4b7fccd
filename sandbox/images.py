"""Synthetic images and their captions: coloured shapes on textured backgrounds.

Everything here is pure and seeded, so the same inputs give the same pixels and words.
The sizes are relative to the image, so a 150 px and a 1200 px image of the same
description look alike once a model resizes them.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORS = {
    "red": (220, 30, 30),
    "orange": (245, 130, 20),
    "yellow": (245, 220, 30),
    "green": (40, 170, 60),
    "blue": (30, 80, 220),
    "purple": (130, 50, 180),
    "pink": (245, 120, 190),
    "brown": (120, 70, 30),
}
SHAPES = ["circle", "square", "triangle", "star", "heart", "cross"]
# Ordinary backgrounds; "hazard" (black and yellow warning stripes) is reserved for the
# unsafe stand-in class, so an image is unsafe exactly when its background is hazard.
BACKGROUNDS = ["plain", "stripes", "dots", "checker", "noise", "gradient"]
UNSAFE_BACKGROUND = "hazard"
LANGUAGES = ["en", "fr", "de", "es", "ru", "zh", "ja"]
TEMPLATE_COUNT = 3
# The subject's radius as a share of the image's short side. How much of the frame the subject
# fills is the sandbox's aesthetic stand-in (see aesthetic_rating).
SUBJECT_SIZE = (0.22, 0.36)

# ----------------------------------------------------------------------------- pixels


def _background_tones(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two low-saturation tones, so the saturated shape colour stands out."""
    level = rng.uniform(90, 235)
    tint = rng.uniform(-12, 12, size=3)
    first = np.clip(level + tint, 0, 255)
    second = np.clip(first + rng.choice([-1, 1]) * rng.uniform(30, 60), 0, 255)
    return first, second


def _pixel_axes(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Column and row coordinates that broadcast to the full image (cheaper than a grid)."""
    return np.arange(width, dtype=np.float32)[None, :], np.arange(height, dtype=np.float32)[:, None]


def _texture_mask(kind: str, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A float mask in [0, 1] of shape (height, width) that mixes the two background tones."""
    side = min(width, height)
    xs, ys = _pixel_axes(width, height)
    if kind == "plain":
        return np.zeros((height, width), np.float32)
    if kind in ("stripes", "hazard"):
        angle = math.pi / 4 if kind == "hazard" else rng.uniform(0, math.pi)
        period = side / (8 if kind == "hazard" else rng.uniform(6, 14))
        along = xs * math.cos(angle) + ys * math.sin(angle)
        return ((along / period) % 1.0 < 0.5).astype(np.float32)
    if kind == "dots":
        period = side / rng.uniform(6, 12)
        dx = (xs % period) - period / 2
        dy = (ys % period) - period / 2
        return (dx * dx + dy * dy < (period * 0.28) ** 2).astype(np.float32)
    if kind == "checker":
        period = side / rng.uniform(5, 10)
        return ((np.floor(xs / period) + np.floor(ys / period)) % 2).astype(np.float32)
    if kind == "noise":
        cells = rng.uniform(0, 255, size=(int(rng.integers(12, 24)),) * 2).astype(np.uint8)
        smooth = Image.fromarray(cells, "L").resize((width, height), Image.BILINEAR)
        return np.asarray(smooth, np.float32) / 255.0
    if kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        along = xs * math.cos(angle) + ys * math.sin(angle)
        return (along - along.min()) / max(float(np.ptp(along)), 1.0)
    raise ValueError(f"unknown background {kind!r}")


def _background(kind: str, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    if kind == UNSAFE_BACKGROUND:
        first, second = (20, 20, 20), (240, 200, 0)
    else:
        first, second = (tuple(int(v) for v in tone) for tone in _background_tones(rng))
    mask = _texture_mask(kind, width, height, rng)
    mask_image = Image.fromarray((mask * 255).astype(np.uint8), "L")
    return Image.composite(Image.new("RGB", (width, height), second),
                           Image.new("RGB", (width, height), first), mask_image)


def _regular_polygon(cx, cy, radius, sides, rotation):
    return [
        (cx + radius * math.cos(rotation + 2 * math.pi * k / sides),
         cy + radius * math.sin(rotation + 2 * math.pi * k / sides))
        for k in range(sides)
    ]


def _star(cx, cy, radius, rotation):
    points = []
    for k in range(10):
        r = radius if k % 2 == 0 else radius * 0.45
        a = rotation + math.pi * k / 5
        points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return points


def _heart(cx, cy, radius, rotation):
    """The classic parametric heart, point down, scaled to `radius`."""
    c, s = math.cos(rotation), math.sin(rotation)
    points = []
    for k in range(64):
        t = 2 * math.pi * k / 64
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)) - 2.5
        x, y = x * radius / 16, y * radius / 16
        points.append((cx + x * c - y * s, cy + x * s + y * c))
    return points


def _cross(cx, cy, radius, rotation):
    arm = radius * 0.36
    outline = [(-arm, -radius), (arm, -radius), (arm, -arm), (radius, -arm), (radius, arm),
               (arm, arm), (arm, radius), (-arm, radius), (-arm, arm), (-radius, arm),
               (-radius, -arm), (-arm, -arm)]
    c, s = math.cos(rotation), math.sin(rotation)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in outline]


def _shape_outline(shape: str, cx: float, cy: float, radius: float, tilt: float):
    up = -math.pi / 2
    if shape == "square":
        return _regular_polygon(cx, cy, radius, 4, math.pi / 4 + tilt)
    if shape == "triangle":
        return _regular_polygon(cx, cy, radius, 3, up + tilt)
    if shape == "star":
        return _star(cx, cy, radius, up + tilt)
    if shape == "heart":
        return _heart(cx, cy, radius, tilt)
    if shape == "cross":
        return _cross(cx, cy, radius, tilt)
    raise ValueError(f"unknown shape {shape!r}")


def _draw_shape(image: Image.Image, color: str, shape: str, rng: np.random.Generator,
                on_hazard: bool = False) -> float:
    """Draw the subject; returns its size (radius over the short side)."""
    width, height = image.size
    side = min(width, height)
    size = rng.uniform(*SUBJECT_SIZE)
    radius = side * size
    # Keep the shape inside the central square: CLIP preprocessing centre-crops to it.
    slack = side / 2 - radius
    cx = width / 2 + rng.uniform(-0.5, 0.5) * slack
    cy = height / 2 + rng.uniform(-0.5, 0.5) * slack
    fill = tuple(int(np.clip(v + rng.uniform(-15, 15), 0, 255)) for v in COLORS[color])
    # A dark outline would vanish into the black hazard stripes: use a wide white one there.
    edge = max(2, round(side / (40 if on_hazard else 80)))
    outline = (255, 255, 255) if on_hazard else (25, 25, 25)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        box = [cx - radius, cy - radius, cx + radius, cy + radius]
        draw.ellipse(box, fill=fill, outline=outline, width=edge)
    else:
        points = _shape_outline(shape, cx, cy, radius, rng.uniform(-0.2, 0.2))
        draw.polygon(points, fill=fill, outline=outline, width=edge)
    return float(size)


def _overlay_watermark(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Semi-transparent diagonal text tiled over the picture, like a stock-photo proof."""
    width, height = image.size
    # Draw the overlay at most ~400 px on its short side, then scale it up: it is the
    # costly part, and a model sees the picture at 64 px anyway.
    scale = min(1.0, 400 / min(width, height))
    small_w, small_h = max(1, round(width * scale)), max(1, round(height * scale))
    side = min(small_w, small_h)
    diagonal = int(math.hypot(small_w, small_h)) + 1
    font = ImageFont.load_default(size=max(10, int(side / 5.5)))
    text = "© STOCK PROOF"
    alpha = int(rng.uniform(150, 200))
    stroke = max(1, side // 120)
    _, _, text_width, text_height = font.getbbox(text, stroke_width=stroke)
    tile = Image.new("RGBA", (text_width, text_height), (0, 0, 0, 0))  # drawn once, pasted many times
    ImageDraw.Draw(tile).text((0, 0), text, font=font, fill=(255, 255, 255, alpha),
                              stroke_width=stroke, stroke_fill=(60, 60, 60, alpha))
    layer = Image.new("RGBA", (diagonal, diagonal), (0, 0, 0, 0))
    row_step = int(side / 3)
    column_step = int(text_width * 1.3)
    for row, y in enumerate(range(0, diagonal, row_step)):
        for x in range(-(row % 2) * column_step // 2, diagonal, column_step):
            layer.paste(tile, (x, y))
    layer = layer.rotate(rng.uniform(25, 40), resample=Image.BILINEAR)
    left, top = (diagonal - small_w) // 2, (diagonal - small_h) // 2
    layer = layer.crop((left, top, left + small_w, top + small_h))
    if scale < 1.0:
        layer = layer.resize((width, height), Image.BILINEAR)
    return Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")


def aesthetic_rating(subject_size: float) -> float:
    """The sandbox's aesthetic stand-in on LAION-Aesthetics' 1-10 scale, from how much of the
    frame the subject fills (its radius over the image's short side): 1 for the smallest subject,
    10 for one that fills the frame ("fill the frame", a first rule of composition).

    It is a fair stand-in because, like a real aesthetic rating, it is a graded property of the
    pixels that no caption names and that CLIP was never trained to see: `shapes` learnt colour,
    shape, background and watermark from captions, and its embeddings carry the subject's size
    only as a side effect, as OpenAI's CLIP carries what LAION's raters liked. It changes no
    pixel of the world (the size was always drawn), so colour and shape stay as recognisable.
    The short side is the frame a CLIP sees after its centre crop, as served and as stored with
    --resize-mode keep_ratio or center_crop, and with "border" too, whose padding clip and embed
    cut off before the model's preprocess (shared/images.py)."""
    low, high = SUBJECT_SIZE
    return float(1 + 9 * np.clip((subject_size - low) / (high - low), 0, 1))


def render(color: str, shape: str, background: str, width: int, height: int,
           rng: np.random.Generator, watermark: bool = False,
           details: dict | None = None) -> Image.Image:
    """Draw one picture. `background` may be UNSAFE_BACKGROUND for the unsafe stand-in.
    `details`, when given, receives "subject_size" (the subject's radius over the short side)
    and its "aesthetic" rating."""
    image = _background(background, width, height, rng)
    size = _draw_shape(image, color, shape, rng, on_hazard=background == UNSAFE_BACKGROUND)
    if details is not None:
        details.update(subject_size=size, aesthetic=aesthetic_rating(size))
    if watermark:
        image = _overlay_watermark(image, rng)
    return image


def encode(image: Image.Image, fmt: str, rng: np.random.Generator) -> bytes:
    """Encode as a web server would serve it: fmt is 'jpeg', 'png' or 'webp'."""
    out = io.BytesIO()
    if fmt == "jpeg":
        image.save(out, "JPEG", quality=int(rng.integers(75, 96)))
    elif fmt == "png":
        image.save(out, "PNG")
    elif fmt == "webp":
        image.save(out, "WEBP", quality=int(rng.integers(70, 91)))
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return out.getvalue()


def aspect_size(rng: np.random.Generator, aspects: tuple[float, float]) -> tuple[int, int]:
    """A size whose width/height is drawn log-uniformly from `aspects` (e.g. (0.5, 2.5), 1:2 to
    2.5:1), the short side a few hundred pixels as on the web (web.web_size keeps the web's few ratios)."""
    low, high = aspects
    aspect = float(np.exp(rng.uniform(math.log(low), math.log(high))))
    short = float(np.clip(np.exp(rng.normal(math.log(300), 0.35)), 150, 600))
    long = short * max(aspect, 1 / aspect)
    return (round(long), round(short)) if aspect >= 1 else (round(short), round(long))


def parse_aspects(text: str) -> tuple[float, float]:
    """'0.5:2.5' (width/height from 1:2 to 2.5:1) -> (0.5, 2.5); ValueError naming the problem."""
    try:
        low, high = (float(part) for part in text.split(":"))
    except ValueError:
        raise ValueError(f"aspect ratios must be LOW:HIGH width/height, e.g. 0.5:2.5, got {text!r}") from None
    if not 0 < low <= high:
        raise ValueError(f"aspect ratios must satisfy 0 < LOW <= HIGH, got {text!r}")
    return low, high


# ----------------------------------------------------------------------------- words
# Each language gets its own small grammar (gender and case agreement), written out
# rather than machine-made, so fastText lid.176 recognises every caption.

_EN_BG = {
    "plain": "a plain background", "stripes": "a striped background",
    "dots": "a dotted background", "checker": "a checkered background",
    "noise": "a noisy background", "gradient": "a gradient background",
    "hazard": "a black and yellow hazard-striped background",
}


def _caption_en(color, shape, background, template):
    article = "an" if color[0] in "aeiou" else "a"
    phrase = f"{article} {color} {shape}"
    if background:
        phrase += f" on {_EN_BG[background]}"
    return ["{}", "a photo of {}", "an illustration of {}"][template].format(phrase)


_FR_SHAPES = {"circle": ("cercle", "m"), "square": ("carré", "m"), "triangle": ("triangle", "m"),
              "star": ("étoile", "f"), "heart": ("cœur", "m"), "cross": ("croix", "f")}
_FR_COLORS = {"red": ("rouge", "rouge"), "orange": ("orange", "orange"),
              "yellow": ("jaune", "jaune"), "green": ("vert", "verte"),
              "blue": ("bleu", "bleue"), "purple": ("violet", "violette"),
              "pink": ("rose", "rose"), "brown": ("marron", "marron")}
_FR_BG = {
    "plain": "sur un fond uni", "stripes": "sur un fond rayé", "dots": "sur un fond à pois",
    "checker": "sur un fond à damier", "noise": "sur un fond granuleux",
    "gradient": "sur un fond dégradé",
    "hazard": "sur un fond à rayures d'avertissement noires et jaunes",
}


def _caption_fr(color, shape, background, template):
    noun, gender = _FR_SHAPES[shape]
    adjective = _FR_COLORS[color][gender == "f"]
    article = "une" if gender == "f" else "un"
    phrase = f"{noun} {adjective}"
    if background:
        phrase += f" {_FR_BG[background]}"
    return [f"{article} {phrase}", f"une photo d'{article} {phrase}",
            f"une image montrant {article} {phrase}"][template]


# (nominative, dative, gender): "Herz" is irregular, "einem roten Herzen".
_DE_SHAPES = {"circle": ("Kreis", "Kreis", "m"), "square": ("Quadrat", "Quadrat", "n"),
              "triangle": ("Dreieck", "Dreieck", "n"), "star": ("Stern", "Stern", "m"),
              "heart": ("Herz", "Herzen", "n"), "cross": ("Kreuz", "Kreuz", "n")}
_DE_COLORS = {"red": "rot", "orange": "orangefarben", "yellow": "gelb", "green": "grün",
              "blue": "blau", "purple": "violett", "pink": "rosafarben", "brown": "braun"}
_DE_BG = {
    "plain": "auf einem einfarbigen Hintergrund", "stripes": "auf einem gestreiften Hintergrund",
    "dots": "auf einem gepunkteten Hintergrund", "checker": "auf einem karierten Hintergrund",
    "noise": "auf einem verrauschten Hintergrund", "gradient": "auf einem Hintergrund mit Farbverlauf",
    "hazard": "auf einem schwarz-gelb gestreiften Warnhintergrund",
}


def _caption_de(color, shape, background, template):
    noun, dative_noun, gender = _DE_SHAPES[shape]
    stem = _DE_COLORS[color]
    nominative = f"ein {stem}{'er' if gender == 'm' else 'es'} {noun}"
    dative = f"einem {stem}en {dative_noun}"
    where = f" {_DE_BG[background]}" if background else ""
    return [f"{nominative}{where}", f"ein Foto von {dative}{where}",
            f"Auf dem Bild ist {nominative}{where} zu sehen"][template]


_ES_SHAPES = {"circle": ("círculo", "m"), "square": ("cuadrado", "m"),
              "triangle": ("triángulo", "m"), "star": ("estrella", "f"),
              "heart": ("corazón", "m"), "cross": ("cruz", "f")}
_ES_COLORS = {"red": ("rojo", "roja"), "orange": ("naranja", "naranja"),
              "yellow": ("amarillo", "amarilla"), "green": ("verde", "verde"),
              "blue": ("azul", "azul"), "purple": ("morado", "morada"),
              "pink": ("rosa", "rosa"), "brown": ("marrón", "marrón")}
_ES_BG = {
    "plain": "sobre un fondo liso", "stripes": "sobre un fondo de rayas",
    "dots": "sobre un fondo de lunares", "checker": "sobre un fondo de cuadros",
    "noise": "sobre un fondo con ruido", "gradient": "sobre un fondo degradado",
    "hazard": "sobre un fondo de rayas de advertencia negras y amarillas",
}


def _caption_es(color, shape, background, template):
    noun, gender = _ES_SHAPES[shape]
    adjective = _ES_COLORS[color][gender == "f"]
    article = "una" if gender == "f" else "un"
    phrase = f"{article} {noun} {adjective}"
    if background:
        phrase += f" {_ES_BG[background]}"
    return ["{}", "una foto de {}", "una imagen que muestra {}"][template].format(phrase)


_RU_SHAPES = {"circle": ("круг", "m"), "square": ("квадрат", "m"),
              "triangle": ("треугольник", "m"), "star": ("звезда", "f"),
              "heart": ("сердце", "n"), "cross": ("крест", "m")}
_RU_COLORS = {"red": ("красный", "красная", "красное"),
              "orange": ("оранжевый", "оранжевая", "оранжевое"),
              "yellow": ("жёлтый", "жёлтая", "жёлтое"), "green": ("зелёный", "зелёная", "зелёное"),
              "blue": ("синий", "синяя", "синее"),
              "purple": ("фиолетовый", "фиолетовая", "фиолетовое"),
              "pink": ("розовый", "розовая", "розовое"),
              "brown": ("коричневый", "коричневая", "коричневое")}
_RU_BG = {
    "plain": "на однотонном фоне", "stripes": "на полосатом фоне",
    "dots": "на фоне в горошек", "checker": "на клетчатом фоне",
    "noise": "на зернистом фоне", "gradient": "на градиентном фоне",
    "hazard": "на фоне из чёрно-жёлтых предупреждающих полос",
}


def _caption_ru(color, shape, background, template):
    noun, gender = _RU_SHAPES[shape]
    phrase = f"{_RU_COLORS[color]['mfn'.index(gender)]} {noun}"
    if background:
        phrase += f" {_RU_BG[background]}"
    return ["{}", "на картинке {}", "фотография: {}"][template].format(phrase)


_ZH_SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形",
              "heart": "心形", "cross": "十字形"}
_ZH_COLORS = {"red": "红色", "orange": "橙色", "yellow": "黄色", "green": "绿色", "blue": "蓝色",
              "purple": "紫色", "pink": "粉色", "brown": "棕色"}
_ZH_BG = {"plain": "纯色背景", "stripes": "条纹背景", "dots": "圆点背景", "checker": "棋盘格背景",
          "noise": "噪点背景", "gradient": "渐变背景", "hazard": "黑黄相间的警示条纹背景"}


def _caption_zh(color, shape, background, template):
    thing = f"一个{_ZH_COLORS[color]}的{_ZH_SHAPES[shape]}"
    if background:
        where = _ZH_BG[background]
        return [f"{where}上的{thing}", f"一张照片：{where}上有{thing}",
                f"图片里，{where}上画着{thing}"][template]
    return [f"{thing}", f"一张{_ZH_COLORS[color]}{_ZH_SHAPES[shape]}的照片",
            f"图片里画着{thing}"][template]


_JA_SHAPES = {"circle": "丸", "square": "正方形", "triangle": "三角形", "star": "星",
              "heart": "ハート", "cross": "十字"}
_JA_COLORS = {"red": "赤い", "orange": "オレンジ色の", "yellow": "黄色い", "green": "緑の",
              "blue": "青い", "purple": "紫の", "pink": "ピンクの", "brown": "茶色の"}
_JA_BG = {"plain": "無地の背景", "stripes": "しま模様の背景", "dots": "水玉模様の背景",
          "checker": "市松模様の背景", "noise": "ざらざらした背景",
          "gradient": "グラデーションの背景", "hazard": "黒と黄色の警告しま模様の背景"}


def _caption_ja(color, shape, background, template):
    thing = f"{_JA_COLORS[color]}{_JA_SHAPES[shape]}"
    if background:
        where = _JA_BG[background]
        return [f"{where}の上にある{thing}", f"{where}に描かれた{thing}の写真",
                f"{thing}が{where}に描かれている画像です"][template]
    return [f"{thing}です", f"{thing}の写真", f"{thing}が描かれている画像です"][template]


_CAPTIONERS = {"en": _caption_en, "fr": _caption_fr, "de": _caption_de, "es": _caption_es,
               "ru": _caption_ru, "zh": _caption_zh, "ja": _caption_ja}

# Appended in training captions only, so the model's image embedding carries the
# watermark and the tag head can read it back.
WATERMARK_PHRASES = {"en": " with a watermark", "fr": " avec un filigrane",
                     "de": " mit Wasserzeichen", "es": " con marca de agua",
                     "ru": " с водяным знаком", "zh": "，带水印", "ja": "（透かし入り）"}


def caption(color: str, shape: str, background: str | None, language: str,
            template: int = 0, watermark: bool = False) -> str:
    """Describe a picture in `language`; background None leaves the background out."""
    text = _CAPTIONERS[language](color, shape, background, template)
    return text + WATERMARK_PHRASES[language] if watermark else text


def camera_caption(rng: np.random.Generator) -> str:
    """A caption with no language, like the file names cameras put in alt text."""
    number = int(rng.integers(1, 9999))
    kind = int(rng.integers(0, 4))
    if kind == 0:
        return f"IMG_{number:04d}.JPG 1/{int(rng.choice([60, 125, 250, 500]))}s"
    if kind == 1:
        return f"DSC{number:05d}.jpg"
    if kind == 2:
        return f"P{number:07d} f/{float(rng.choice([1.8, 2.8, 4.0, 5.6]))} ISO{int(rng.choice([100, 200, 400, 800]))}"
    return f"2019{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}_{number:06d}.jpg"
