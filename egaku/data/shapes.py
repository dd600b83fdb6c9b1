"""The `shapes` world: a procedural, captioned 64x64 dataset whose every pixel we can check.

One shape per image, described by five attributes that the caption states in a fixed grammar::

    "a small red triangle at the top left on a black background"
     ^ size  ^ colour ^ shape  ^ position        ^ background

The world is small enough to train a latent diffusion model on a laptop CPU, yet compositional:
``HELD_OUT_PAIRS`` lists colour+shape pairs that never appear in training, so a model that draws a
"green triangle" having seen only green things and triangles shows that it composes attributes.
The ``star`` is drawn by the renderer and known to the judge but never used for training the base
model: it is the new concept that LoRA fine-tuning is measured on.

Everything is a pure function of a seed: ``render`` draws an attribute set (supersampled 4x and
box-filtered, so edges are anti-aliased like a real image), ``sample_attributes`` draws attribute sets
with numpy's ``default_rng``, ``make_dataset`` does both for n images.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
TRAIN_SHAPES = SHAPES[:-1]  # the star is never shown to the base model
NOVEL_SHAPES = ("star",)
COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "purple": (150, 60, 200),
}
# Backgrounds come from their own palette so that a shape never disappears into its background.
BACKGROUNDS = {
    "black": (15, 15, 15),
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
    "navy": (20, 30, 90),
}
SIZES = {"small": 9.0, "large": 17.0}  # circumradius in pixels at 64x64
POSITIONS = {  # shape centre, in pixels at 64x64
    "top left": (18.0, 18.0),
    "top right": (46.0, 18.0),
    "bottom left": (18.0, 46.0),
    "bottom right": (46.0, 46.0),
    "center": (32.0, 32.0),
}
# One colour+shape pair per shape and per colour, never seen in training (a "Latin" diagonal, so each
# colour and each shape is still seen in four other pairs).
HELD_OUT_PAIRS = frozenset({
    ("red", "square"),
    ("orange", "triangle"),
    ("green", "diamond"),
    ("blue", "cross"),
    ("purple", "circle"),
})
ATTRIBUTES = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
}
JITTER = 2.0  # max centre offset in pixels, so positions are regions rather than exact points
SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    colour: str
    size: str
    position: str
    background: str
    dx: float = 0.0  # jitter of the centre, pixels
    dy: float = 0.0
    angle: float = 0.0  # small rotation in degrees (shapes keep their identity)

    @property
    def caption(self) -> str:
        return caption_for(self.shape, self.colour, self.size, self.position, self.background)

    @property
    def held_out(self) -> bool:
        return (self.colour, self.shape) in HELD_OUT_PAIRS

    def labels(self) -> dict[str, int]:
        """Attribute name -> class index in ``ATTRIBUTES`` (the judge's targets)."""
        return {name: ATTRIBUTES[name].index(getattr(self, name)) for name in ATTRIBUTES}


def caption_for(shape: str, colour: str, size: str, position: str, background: str) -> str:
    where = "in the center" if position == "center" else f"at the {position}"
    return f"a {size} {colour} {shape} {where} on a {background} background"


def parse_caption(caption: str) -> ShapeSpec | None:
    """The attributes of a caption written by ``caption_for`` (None for anything else)."""
    for spec in all_specs():
        if spec.caption == caption.strip().lower():
            return spec
    return None


def all_specs(shapes: tuple[str, ...] = SHAPES) -> list[ShapeSpec]:
    """Every attribute combination of the world (no jitter)."""
    return [ShapeSpec(s, c, z, p, b) for s, c, z, p, b in itertools.product(
        shapes, COLOURS, SIZES, POSITIONS, BACKGROUNDS)]


def training_specs() -> list[ShapeSpec]:
    """Combinations the base model trains on: no star, no held-out colour+shape pair."""
    return [s for s in all_specs(TRAIN_SHAPES) if not s.held_out]


def vocabulary_captions() -> list[str]:
    """One caption per combination of the whole world (star included), for building the tokenizer."""
    return [s.caption for s in all_specs()]


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def ring(n: int, radius: float, start: float) -> list[tuple[float, float]]:
        return [(cx + radius * math.cos(start + 2 * math.pi * k / n),
                 cy + radius * math.sin(start + 2 * math.pi * k / n)) for k in range(n)]

    a = math.radians(angle)
    if shape == "square":
        return ring(4, r, a + math.pi / 4)
    if shape == "diamond":
        # a rhombus taller than wide, so it differs from a rotated square at any jitter angle
        pts = [(0.0, -r), (0.7 * r, 0.0), (0.0, r), (-0.7 * r, 0.0)]
    elif shape == "triangle":
        return ring(3, r, a - math.pi / 2)
    elif shape == "cross":
        w = 0.36 * r
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w),
               (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
    elif shape == "star":
        pts = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.42 * r
            t = -math.pi / 2 + math.pi * k / 5
            pts.append((radius * math.cos(t), radius * math.sin(t)))
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    ca, sa = math.cos(a), math.sin(a)
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts]


def render(spec: ShapeSpec, size: int = SIZE) -> Image.Image:
    """Draw one image of ``spec`` (RGB, ``size`` x ``size``)."""
    return _draw(spec, size, mask=False)


def render_mask(spec: ShapeSpec, size: int = SIZE) -> Image.Image:
    """Where the shape of ``render(spec)`` lies: white on black, grey along its anti-aliased edge (a loss mask)."""
    return _draw(spec, size, mask=True)


def _draw(spec: ShapeSpec, size: int, mask: bool) -> Image.Image:
    for name in ATTRIBUTES:
        if getattr(spec, name) not in ATTRIBUTES[name]:
            raise ValueError(f"unknown {name} {getattr(spec, name)!r}; choose from {', '.join(ATTRIBUTES[name])}")
    mode, background, fill = ("L", 0, 255) if mask else ("RGB", BACKGROUNDS[spec.background], COLOURS[spec.colour])
    s = SUPERSAMPLE * size / SIZE
    big = Image.new(mode, (round(SIZE * s),) * 2, background)
    draw = ImageDraw.Draw(big)
    cx, cy = POSITIONS[spec.position]
    cx, cy, r = (cx + spec.dx) * s, (cy + spec.dy) * s, SIZES[spec.size] * s
    if spec.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(spec.shape, cx, cy, r, spec.angle), fill=fill)
    return big.resize((size, size), Image.Resampling.BOX)


def _balanced_picks(pool: list[ShapeSpec], n: int, rng: np.random.Generator) -> list[int]:
    """``n`` indices into ``pool``, each the item whose attribute values, then pairs of values (small + white, ...),
    were picked least so far, ties broken at random: every value and pair comes up about equally often, as in a
    data set put together to cover its concept, where ``n`` uniform draws of a few dozen leave some out."""
    import itertools
    from collections import Counter

    def values(spec: ShapeSpec) -> list[tuple[str, str]]:
        return [(name, getattr(spec, name)) for name in ATTRIBUTES]

    used: Counter = Counter()
    picks = []
    for _ in range(n):
        def cost(k: int) -> tuple[int, int]:  # single values first, then pairs
            vals = values(pool[k])
            return sum(used[v] for v in vals), sum(used[p] for p in itertools.combinations(vals, 2))

        best = min(rng.permutation(len(pool)).tolist(), key=cost)  # the first of the cheapest in a random order
        vals = values(pool[best])
        used.update(vals)
        used.update(itertools.combinations(vals, 2))
        picks.append(best)
    return picks


def sample_attributes(n: int, seed: int, split: str = "train", balanced: bool = False) -> list[ShapeSpec]:
    """``n`` random attribute sets with jitter, from the combinations of ``split``.

    ``train``: training combinations; ``held_out``: only held-out colour+shape pairs (trained shapes);
    ``novel``: stars; ``all``: every combination (the judge trains on this). ``balanced``: instead of
    independent draws, spread the picks so that every attribute value and pair of values is about equally
    frequent (a small fine-tuning set that covers its concept).
    """
    pools = {
        "train": training_specs,
        "held_out": lambda: [s for s in all_specs(TRAIN_SHAPES) if s.held_out],
        "novel": lambda: all_specs(NOVEL_SHAPES),
        "all": all_specs,
    }
    if split not in pools:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(pools)}")
    pool = pools[split]()
    rng = np.random.default_rng(seed)
    picks = _balanced_picks(pool, n, rng) if balanced else rng.integers(0, len(pool), size=n)
    jitter = rng.uniform(-JITTER, JITTER, size=(n, 2))
    angles = rng.uniform(-10.0, 10.0, size=n)
    out = []
    for i, k in enumerate(picks):
        base = pool[int(k)]
        out.append(ShapeSpec(base.shape, base.colour, base.size, base.position, base.background,
                             dx=float(jitter[i, 0]), dy=float(jitter[i, 1]), angle=float(angles[i])))
    return out


def make_dataset(n: int, seed: int, split: str = "train", size: int = SIZE) -> tuple[np.ndarray, list[ShapeSpec]]:
    """(uint8 array [n, size, size, 3], specs): the images and the attributes that made them."""
    specs = sample_attributes(n, seed, split)
    images = np.stack([np.asarray(render(s, size)) for s in specs]) if specs else np.zeros((0, size, size, 3), np.uint8)
    return images, specs


def write_caption_folder(specs: list[ShapeSpec], folder: str | Path, size: int = SIZE, prefix: str = "shape",
                         mask_folder: str | Path | None = None) -> int:
    """Render ``specs`` into ``folder`` with a diffusers-layout ``metadata.jsonl`` of their captions
    (what ``egaku train-lora --data`` reads), and their shapes' masks under the same names into ``mask_folder``
    (``--mask-dir``); returns the number of images written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if mask_folder is not None:
        Path(mask_folder).mkdir(parents=True, exist_ok=True)
    rows = []
    for i, spec in enumerate(specs):
        name = f"{prefix}-{i:03d}.png"
        render(spec, size=size).save(folder / name)
        if mask_folder is not None:
            render_mask(spec, size=size).save(Path(mask_folder) / name)
        rows.append(json.dumps({"file_name": name, "text": spec.caption}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return len(rows)
