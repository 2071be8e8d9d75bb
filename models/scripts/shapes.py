"""Simple captioned scenes: one flat-coloured shape on a flat background ("a red circle on a white
background"). The base model (train_base.py) learns circles, squares and triangles; the concept set
for the tutorial (make_tiny.py `make_concept`) is stars, a shape the base model never saw.

Scenes are drawn at 4x and reduced with a box filter (anti-aliased edges). Every scene comes from
`scene(rng, shapes)` with a numpy Generator, so a seed fixes the data set. Only numpy and Pillow.
"""

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 170),
    "orange": (240, 140, 30),
}
BACKGROUNDS = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "light blue": (190, 220, 250),
}
BASE_SHAPES = ("circle", "square", "triangle")
CONCEPT_SHAPE = "star"
SIZE = 64
JITTER = 6  # centre offset in pixels, uniform in [-JITTER, JITTER]
RADIUS = (15.0, 21.0)  # half the shape's extent in pixels, uniform
SUPERSAMPLE = 4


def caption(shape, color, background):
    article = "an" if color[0] in "aeiou" else "a"
    return f"{article} {color} {shape} on a {background} background"


def scene(rng, shapes=BASE_SHAPES):
    """One random scene: shape, colour names, centre and radius (pixels at SIZE)."""
    return {
        "shape": shapes[rng.integers(len(shapes))],
        "color": list(COLORS)[rng.integers(len(COLORS))],
        "background": list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
        "cx": SIZE / 2 + rng.uniform(-JITTER, JITTER),
        "cy": SIZE / 2 + rng.uniform(-JITTER, JITTER),
        "r": rng.uniform(*RADIUS),
    }


def outline(shape, cx, cy, r):
    """The shape's polygon (or ellipse box for a circle) in pixel coordinates."""
    if shape == "circle":
        return [cx - r, cy - r, cx + r, cy + r]
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "star":
        pts = []
        for k in range(10):
            a = np.pi / 2 + k * np.pi / 5
            rr = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rr * np.cos(a), cy - rr * np.sin(a)))
        return pts
    raise ValueError(f"unknown shape {shape!r}")


def mask(shape, cx, cy, r, size=SIZE):
    """Anti-aliased coverage of the shape in [0, 1], float32 [size, size]."""
    s = SUPERSAMPLE
    img = Image.new("L", (size * s, size * s), 0)
    d = ImageDraw.Draw(img)
    o = outline(shape, cx * s, cy * s, r * s)
    if shape == "circle":
        d.ellipse(o, fill=255)
    else:
        d.polygon(o, fill=255)
    img = img.resize((size, size), Image.BOX)
    return np.asarray(img, dtype=np.float32) / 255.0


def render(sc, size=SIZE):
    """The scene as an RGB uint8 array [size, size, 3]."""
    m = mask(sc["shape"], sc["cx"], sc["cy"], sc["r"], size)[..., None]
    fg = np.array(COLORS[sc["color"]], dtype=np.float32)
    bg = np.array(BACKGROUNDS[sc["background"]], dtype=np.float32)
    return np.round(m * fg + (1 - m) * bg).astype(np.uint8)


def render_many(seed, n, shapes=BASE_SHAPES):
    """n scenes from one seed: (uint8 [n, SIZE, SIZE, 3], captions, scenes)."""
    rng = np.random.default_rng(seed)
    scenes = [scene(rng, shapes) for _ in range(n)]
    images = np.stack([render(sc) for sc in scenes])
    return images, [caption(sc["shape"], sc["color"], sc["background"]) for sc in scenes], scenes


# ----------------------------------------------------------------------------- reading a picture back


def read_scene(img):
    """What a generated picture shows, by a simple, documented rule (docs/tutorial.md):
    background = nearest BACKGROUNDS colour to the median of the border pixels; shape pixels = those
    farther than 60 (RGB distance) from the background colour; colour = nearest COLORS entry to their
    median; shape = the canonical shape (BASE_SHAPES + star) whose mask, placed at the pixels'
    centroid and sized to their area, has the highest IoU with them. Returns a dict with those names,
    the IoU of each shape, and the foreground fraction."""
    a = np.asarray(img, dtype=np.float32)[..., :3]
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    med = np.median(border, axis=0)
    bg_name = min(BACKGROUNDS, key=lambda k: np.sum((np.array(BACKGROUNDS[k]) - med) ** 2))
    dist = np.sqrt(np.sum((a - np.array(BACKGROUNDS[bg_name], dtype=np.float32)) ** 2, axis=-1))
    fg = dist > 60.0
    out = {"background": bg_name, "foreground_fraction": float(fg.mean()), "color": None, "shape": None, "iou": {}}
    if fg.sum() < 8:
        return out
    fmed = np.median(a[fg], axis=0)
    out["color"] = min(COLORS, key=lambda k: np.sum((np.array(COLORS[k]) - fmed) ** 2))
    ys, xs = np.nonzero(fg)
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
    area = fg.sum()
    for shape in (*BASE_SHAPES, CONCEPT_SHAPE):
        unit = mask(shape, SIZE / 2, SIZE / 2, 10.0).sum()  # area at r = 10
        r = 10.0 * np.sqrt(area / unit)
        # centroid of the shape's own mask differs from its nominal centre (triangle, star)
        m0 = mask(shape, SIZE / 2, SIZE / 2, r)
        yy, xx = np.nonzero(m0 > 0.5)
        dy, dx = (yy.mean() + 0.5 - SIZE / 2) if len(yy) else 0.0, (xx.mean() + 0.5 - SIZE / 2) if len(xx) else 0.0
        m = mask(shape, cx - dx, cy - dy, r) > 0.5
        out["iou"][shape] = float((m & fg).sum() / max(1, (m | fg).sum()))
    out["shape"] = max(out["iou"], key=out["iou"].get)
    return out
