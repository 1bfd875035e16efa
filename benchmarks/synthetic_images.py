"""Synthetic image folders for measuring salve on data it was not tuned on.

Three families, each six classes a person tells apart at a glance, drawn with PIL from a seed:

- ``shapes`` (development): a filled shape (circle, square, triangle, cross, ring, star) of a
  random colour, size and position on a noisy background. The fine-tuning defaults were checked
  on it during development.
- ``patterns`` (held out): textures (horizontal, vertical and diagonal stripes, checkerboard,
  dot grid, concentric rings) with random frequency, phase and colours plus noise. Never used to
  choose a default; the README and closing notes report results on it.
- ``marks`` (held out, added after ``patterns`` had been looked at many times): pen strokes
  (a straight line, a sine wave, a zigzag, a spiral, a hash sign, an arc) of a random colour,
  width, size, position and rotation on a noisy background. Never used to choose a default.

`python benchmarks/synthetic_images.py patterns data/patterns` writes ``<out>/<class>/<i>.png``.
`fill_folder` draws the same kinds of image, each from its own seed, so a large folder (the
memory benchmark's) is drawn once and grows by the missing files only.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring", "star")
PATTERNS = ("hstripes", "vstripes", "diagonal", "checker", "dots", "rings")
MARKS = ("line", "wave", "zigzag", "spiral", "hash", "arc")


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(30, 226, 3))


def _noisy_background(rng: np.random.Generator, size: int) -> Image.Image:
    base = rng.integers(0, 256, 3)
    noise = rng.normal(0, 18, (size, size, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def draw_shape(kind: str, rng: np.random.Generator, size: int) -> Image.Image:
    img = _noisy_background(rng, size)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.18, 0.32) * size
    cx, cy = rng.uniform(r + 2, size - r - 2, 2)
    colour = _colour(rng)
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif kind == "cross":
        w = r / 3
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
    elif kind == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(r / 3)))
    else:  # star
        points = []
        for i in range(10):
            rad = r if i % 2 == 0 else r / 2.5
            angle = math.pi / 2 + i * math.pi / 5
            points.append((cx + rad * math.cos(angle), cy - rad * math.sin(angle)))
        draw.polygon(points, fill=colour)
    return img


def draw_pattern(kind: str, rng: np.random.Generator, size: int) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    period = rng.uniform(5, 12)
    phase = rng.uniform(0, 2 * math.pi)
    if kind == "hstripes":
        wave = np.sin(2 * math.pi * yy / period + phase)
    elif kind == "vstripes":
        wave = np.sin(2 * math.pi * xx / period + phase)
    elif kind == "diagonal":
        sign = rng.choice([-1, 1])
        wave = np.sin(2 * math.pi * (xx + sign * yy) / (period * 1.4) + phase)
    elif kind == "checker":
        wave = np.sign(np.sin(2 * math.pi * xx / period + phase)) * np.sign(
            np.sin(2 * math.pi * yy / period + phase)
        )
    elif kind == "dots":
        wave = np.cos(2 * math.pi * xx / period + phase) * np.cos(2 * math.pi * yy / period)
        wave = (wave > 0.35).astype(np.float64) * 2 - 1
    else:  # concentric rings around a random centre
        cx, cy = rng.uniform(0.3, 0.7, 2) * size
        wave = np.sin(2 * math.pi * np.hypot(xx - cx, yy - cy) / period + phase)
    a = np.array(_colour(rng))
    b = np.clip(255 - a + rng.integers(-40, 41, 3), 0, 255)  # contrasting: the texture shows
    mix = (wave[..., None] + 1) / 2
    pixels = a * mix + b * (1 - mix) + rng.normal(0, 14, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _mark_points(kind: str, rng: np.random.Generator) -> list[list[tuple[float, float]]]:
    """Polylines of one mark in a unit frame centred on 0 (x, y in about [-1, 1])."""
    t = np.linspace(-1, 1, 60)
    if kind == "line":
        return [[(-1.0, 0.0), (1.0, 0.0)]]
    if kind == "wave":
        cycles = rng.uniform(1.0, 2.0)
        return [list(zip(t, 0.4 * np.sin(math.pi * cycles * t + rng.uniform(0, 6)), strict=True))]
    if kind == "zigzag":
        teeth = int(rng.integers(3, 6))
        xs = np.linspace(-1, 1, 2 * teeth + 1)
        return [[(x, 0.4 * (1 if i % 2 else -1)) for i, x in enumerate(xs)]]
    if kind == "spiral":
        a = np.linspace(0, rng.uniform(3.0, 4.0) * math.pi, 120)
        r = a / a[-1]
        return [list(zip(r * np.cos(a), r * np.sin(a), strict=True))]
    if kind == "hash":
        o = rng.uniform(0.25, 0.4)
        return [
            [(-o, -1.0), (-o, 1.0)],
            [(o, -1.0), (o, 1.0)],
            [(-1.0, -o), (1.0, -o)],
            [(-1.0, o), (1.0, o)],
        ]
    a = np.linspace(0, math.pi, 60)  # arc: a half circle
    return [list(zip(np.cos(a), 0.5 - np.sin(a), strict=True))]


def draw_mark(kind: str, rng: np.random.Generator, size: int) -> Image.Image:
    img = _noisy_background(rng, size)
    draw = ImageDraw.Draw(img)
    scale = rng.uniform(0.25, 0.38) * size
    cx, cy = rng.uniform(scale + 2, size - scale - 2, 2)
    turn = rng.uniform(0, 2 * math.pi)
    cos, sin = math.cos(turn), math.sin(turn)
    width = max(2, int(round(rng.uniform(0.05, 0.09) * size)))
    colour = _colour(rng)
    for line in _mark_points(kind, rng):
        pts = [
            (cx + scale * (x * cos - y * sin), cy + scale * (x * sin + y * cos)) for x, y in line
        ]
        draw.line(pts, fill=colour, width=width, joint="curve")
    return img


FAMILIES = {
    "shapes": (SHAPES, draw_shape),
    "patterns": (PATTERNS, draw_pattern),
    "marks": (MARKS, draw_mark),
}


def family_of(family: str):
    """(class names, draw function) of a family; ValueError naming the choices."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[family]


def make_folder(family: str, out: Path, *, per_class: int = 160, size: int = 64, seed: int = 0):
    """Write ``per_class`` PNGs per class under ``out/<class>/``; returns the class names."""
    classes, draw = family_of(family)
    rng = np.random.default_rng([seed, 0x5A17E])
    for name in classes:
        folder = Path(out) / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw(name, rng, size).save(folder / f"{i:04d}.png")
    return list(classes)


def fill_folder(
    family: str,
    out: Path,
    counts: dict[str, int] | int,
    *,
    size: int = 64,
    seed: int = 0,
    ext: str = ".jpg",
) -> int:
    """Make sure ``out/<class>/<i:06d><ext>`` exists for i < counts[class] (an int: every
    class); returns how many files were drawn. Image i of a class depends only on (seed, class,
    i), so files already there are kept and the folder is a cache. Each file is written under a
    hidden temporary name (which folder scans skip) and renamed: an interrupted run leaves no
    half-written image. JPEG (quality 90) by default: small files, decoded as photos are."""
    classes, draw = family_of(family)
    if isinstance(counts, int):
        counts = dict.fromkeys(classes, counts)
    drawn = 0
    for k, name in enumerate(classes):
        folder = Path(out) / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(counts.get(name, 0)):
            path = folder / f"{i:06d}{ext}"
            if path.exists():
                continue
            rng = np.random.default_rng([seed, 0x5A17E, k, i])
            tmp = folder / f".{path.name}.tmp{ext}"
            draw(name, rng, size).save(tmp, quality=90)
            tmp.replace(path)
            drawn += 1
    return drawn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("family", choices=tuple(FAMILIES))
    p.add_argument("out", type=Path)
    p.add_argument("--per-class", type=int, default=160)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    classes = make_folder(
        args.family, args.out, per_class=args.per_class, size=args.size, seed=args.seed
    )
    print(f"wrote {len(classes) * args.per_class} images in {len(classes)} classes to {args.out}")


if __name__ == "__main__":
    main()
