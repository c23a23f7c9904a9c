"""Rendering of synthetic shape scenes: a pure function from a scene description to a PIL image.

Contract: ``render_scene(scene) -> PIL.Image.Image`` (RGB, ``scene["width"] x scene["height"]``) draws
``scene["background"]`` and then every shape of ``scene["shapes"]``; it draws nothing that the scene does not
describe, and the same scene always gives the same pixels (the background noise has its own seed inside the
scene). Shapes are filled polygons/ellipses drawn on a 4x supersampled mask and box-filtered down, so edges
are antialiased at any size. The scene dicts are plain JSON (they travel inside the dataset records), with
positions and sizes in pixels:

    {"width": 64, "height": 64,
     "background": {"style": "vgradient", "colors": [[r,g,b], [r,g,b]], "noise": 5.0, "noise_seed": 123},
     "shapes": [{"shape": "circle", "color": "red", "rgb": [r,g,b], "cx": 20.5, "cy": 31.0,
                 "size": 18.2, "rotation": 0.0}, ...]}

``size`` is the diameter of the shape's bounding circle: every shape lies inside the circle of radius
``size / 2`` around ``(cx, cy)``, which is what the scene sampler uses to keep shapes apart.
This module also holds the palettes (shape names, colour names and their RGB) shared with the generator.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "diamond": "diamonds", "cross": "crosses"}

# Base RGB per colour name, chosen far apart from each other (and each rendered with a small jitter).
COLORS = {
    "red": (215, 35, 35),
    "green": (35, 160, 60),
    "blue": (35, 80, 215),
    "yellow": (240, 215, 35),
    "orange": (245, 135, 20),
    "purple": (135, 50, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}

BACKGROUND_STYLES = ("solid", "vgradient", "hgradient", "dgradient", "radial")

_SUPERSAMPLE = 4


def shape_polygon(shape: str, cx: float, cy: float, radius: float, rotation: float) -> list[tuple[float, float]]:
    """Vertices of ``shape`` (not circle) inside the circle of ``radius`` around (cx, cy); rotation in degrees."""

    def ring(n: int, radii: list[float], start_deg: float) -> list[tuple[float, float]]:
        pts = []
        for k in range(n):
            a = math.radians(start_deg + rotation + 360.0 * k / n)
            r = radii[k % len(radii)]
            pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        return pts

    if shape == "square":
        return ring(4, [radius], 45.0)
    if shape == "triangle":
        # -90 deg puts a vertex at the top (image y grows downwards).
        return ring(3, [radius], -90.0)
    if shape == "star":
        # Inner radius 0.42 keeps the spikes visible at ~15 px, where a fatter star reads as a pentagon.
        return ring(10, [radius, 0.42 * radius], -90.0)
    if shape == "diamond":
        # A tall rhombus (width 0.62 of height): never confusable with a square tilted by <= 15 degrees.
        w = 0.62 * radius
        base = [(0.0, -radius), (w, 0.0), (0.0, radius), (-w, 0.0)]
    elif shape == "cross":
        # A plus sign: half arm width 0.28 r, arm length 0.94 r, so its corners reach 0.98 r.
        h = 0.28 * radius
        e = 0.94 * radius
        base = [(-h, -e), (h, -e), (h, -h), (e, -h), (e, h), (h, h), (h, e), (-h, e), (-h, h), (-e, h),
                (-e, -h), (-h, -h)]
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in base]


def render_background(bg: dict, width: int, height: int) -> np.ndarray:
    """The background as a float32 array (H, W, 3) in [0, 255], noise included."""
    c0 = np.asarray(bg["colors"][0], dtype=np.float32)
    c1 = np.asarray(bg["colors"][-1], dtype=np.float32)
    style = bg["style"]
    ys = (np.arange(height, dtype=np.float32) + 0.5) / height
    xs = (np.arange(width, dtype=np.float32) + 0.5) / width
    if style == "solid":
        t = np.zeros((height, width), dtype=np.float32)
    elif style == "vgradient":
        t = np.broadcast_to(ys[:, None], (height, width))
    elif style == "hgradient":
        t = np.broadcast_to(xs[None, :], (height, width))
    elif style == "dgradient":
        t = (ys[:, None] + xs[None, :]) / 2.0
    elif style == "radial":
        d = np.sqrt((ys[:, None] - 0.5) ** 2 + (xs[None, :] - 0.5) ** 2)
        t = np.clip(d / math.sqrt(0.5), 0.0, 1.0)
    else:
        raise ValueError(f"unknown background style {style!r}; expected one of {BACKGROUND_STYLES}")
    arr = c0[None, None, :] + (c1 - c0)[None, None, :] * t[:, :, None]  # (H, W, 3)
    sigma = float(bg.get("noise", 0.0))
    if sigma > 0:
        noise = np.random.default_rng(int(bg["noise_seed"])).normal(0.0, sigma, size=(height, width, 3))
        arr = arr + noise.astype(np.float32)
    return np.clip(arr, 0.0, 255.0)


def shape_mask(shape: dict) -> tuple[Image.Image, tuple[int, int]]:
    """Antialiased coverage mask ("L") of one shape and the (x, y) of its top-left corner in the image."""
    r = shape["size"] / 2.0
    x0 = int(math.floor(shape["cx"] - r)) - 1
    y0 = int(math.floor(shape["cy"] - r)) - 1
    w = int(math.ceil(shape["cx"] + r)) + 1 - x0
    h = int(math.ceil(shape["cy"] + r)) + 1 - y0
    ss = _SUPERSAMPLE
    big = Image.new("L", (w * ss, h * ss), 0)
    draw = ImageDraw.Draw(big)
    # Local supersampled coordinates: pixel (x, y) covers [x, x+1) so its centre is x + 0.5.
    cx, cy, rr = (shape["cx"] - x0) * ss, (shape["cy"] - y0) * ss, r * ss
    if shape["shape"] == "circle":
        draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=255)
    else:
        draw.polygon(shape_polygon(shape["shape"], cx, cy, rr, shape.get("rotation", 0.0)), fill=255)
    return big.reduce(ss), (x0, y0)


def render_scene(scene: dict) -> Image.Image:
    """Draw a scene description (see the module docstring) into a new RGB image."""
    width, height = int(scene["width"]), int(scene["height"])
    bg = render_background(scene["background"], width, height)
    img = Image.fromarray(np.rint(bg).astype(np.uint8), "RGB")
    for shape in scene["shapes"]:
        mask, offset = shape_mask(shape)
        # Paste a flat colour through the coverage mask: only the shape's own pixels change.
        img.paste(tuple(int(v) for v in shape["rgb"]), (*offset, offset[0] + mask.width, offset[1] + mask.height),
                  mask)
    return img
