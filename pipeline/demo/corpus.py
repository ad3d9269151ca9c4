"""The offline demo corpus: seeded synthetic scenes with true captions and a known complexity, as img2dataset writes them.

No image set can be downloaded on an offline machine, so ICAR ships a generator. Each scene is a few
groups of coloured shapes ("two red circles and a blue square in the top left") on a plain, gradient,
striped, checkered or noisy background, with optional clutter (small specks, scribbled lines) and film
grain. The caption says what is in the picture; the ground-truth complexity is a documented function of
the generating parameters (see ``scene_complexity``), so a complexity scorer can be trained and scored
against it and the routing of an early-exit encoder can be audited.

Layout written under the output directory (every split dir is an img2dataset WebDataset output folder):

    corpus.json                   parameters, splits and their shards, the complexity formula
    scenes.parquet                one row per image: key, split, caption, shorter true captions, complexity and
                                  the generating parameters
    train/ val/ test/             NNNNN.tar (KEY.jpg, KEY.txt, KEY.json), NNNNN.parquet, NNNNN_stats.json
    complexity/images/KEY.jpg     IC9600 layout: a subset of train plus the whole test split
    complexity/train.txt          "KEY.jpg  score" lines (IC9600 separates with two spaces), scores in [0, 1]
    complexity/test.txt

Shard ids run on across the splits (train first, then val, then test), so keys are unique in the corpus.
Every scene is drawn from its own random stream seeded by (seed, split, index): the same seed gives
byte-identical shards, and the val/test scenes do not depend on the size of the train split.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import os
import tarfile
import time
import uuid
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from pipeline.io import storage

log = logging.getLogger(__name__)

CORPUS_VERSION = 1  # bump when a change to the generator changes the images for the same seed
SPLITS = ("train", "val", "test")
HELD_OUT_FRACTION = 0.05  # default share of --n in each of val and test
_SPLIT_STREAM = {"train": 0, "val": 1, "test": 2}  # per-split random streams: val/test do not move with --n
OOM_SHARD_COUNT = 5  # img2dataset's default: shard names are 5 digits ("00000.tar")
TAR_MTIME = 1_704_067_200  # fixed member time (2024-01-01) so shards are byte-identical across runs
FAKE_URL = "https://demo.icar.invalid/{split}/{key}.jpg"  # ".invalid" is reserved: never resolves

# Named colours (RGB). Captions only ever use these names, so the text side is learnable from scratch.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 135, 30),
    "purple": (135, 60, 190),
    "pink": (245, 135, 195),
    "cyan": (40, 200, 215),
    "brown": (125, 75, 35),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon")
_PLURAL = {"cross": "crosses"}
_NUMBER = {2: "two", 3: "three", 4: "four"}
# Object radius as a fraction of the image side.
SIZES = {"small": 0.07, "medium": 0.105, "large": 0.19}
# Regions a group can be confined to: (x0, y0, x1, y1) in unit coordinates, and the most objects that fit.
REGIONS: dict[str, tuple[tuple[float, float, float, float], int]] = {
    "in the top left": ((0.0, 0.0, 0.5, 0.5), 2),
    "in the top right": ((0.5, 0.0, 1.0, 0.5), 2),
    "in the bottom left": ((0.0, 0.5, 0.5, 1.0), 2),
    "in the bottom right": ((0.5, 0.5, 1.0, 1.0), 2),
    "in the center": ((0.25, 0.25, 0.75, 0.75), 2),
    "on the left": ((0.0, 0.0, 0.5, 1.0), 4),
    "on the right": ((0.5, 0.0, 1.0, 1.0), 4),
    "at the top": ((0.0, 0.0, 1.0, 0.5), 4),
    "at the bottom": ((0.0, 0.5, 1.0, 1.0), 4),
}
BACKGROUNDS = ("plain", "gradient", "stripes", "checker", "noise")
_BACKGROUND_WORD = {"plain": "plain {c}", "gradient": "{c} gradient", "stripes": "striped {c}",
                    "checker": "checkered {c}", "noise": "noisy {c}"}

# Complexity formula (ground truth). Limits of the generator, used to normalise each term to [0, 1].
MAX_GROUPS = 3
MAX_COUNT = 4
MAX_OBJECTS = MAX_GROUPS * MAX_COUNT
MAX_SPECKS = 40
MAX_LINES = 12
MAX_GRAIN = 20.0  # standard deviation of the film grain, in 8-bit levels
W_OBJECTS, W_CLUTTER, W_TEXTURE = 0.4, 0.3, 0.3
COMPLEXITY_FORMULA = (
    "complexity = 0.4*objects + 0.3*clutter + 0.3*texture, where "
    "objects = (n_objects - 1) / 11; "
    "clutter = min(1, (n_specks + 2*n_lines) / 64); "
    "texture = min(1, pattern_energy + grain / 40), pattern_energy: plain 0, gradient 0.1, "
    "stripes 0.3-0.7 and checker 0.4-0.75 (finer is higher), noise 0.4-1.0 (stronger is higher); "
    "grain is the film-grain standard deviation in 8-bit levels (0-20)"
)


@dataclass
class DemoCorpusConfig:
    """What `icar make-demo-corpus` generates; see `icar make-demo-corpus --help`."""

    output: str  # corpus directory (local path or fsspec URL)
    n: int = 20_000  # images in all splits together; train gets n - val - test
    val: int | None = None  # held-out images for exit-head training and router calibration; None: 5% of n
    test: int | None = None  # held-out images for the quality benchmark and complexity test labels; None: 5% of n
    seed: int = 0  # same seed -> byte-identical shards
    shard_size: int = 1_000  # images per WebDataset shard (img2dataset's number_sample_per_shard)
    image_size: int = 128  # side of the square JPEGs, in pixels
    jpeg_quality: int = 90  # JPEG quality of the stored images
    complexity_train: int = 4_000  # train images also written to complexity/ (IC9600 layout); at most the train split
    progress: bool = True  # progress bar on stderr

    def split_sizes(self) -> dict[str, int]:
        """Return the number of images per split, checking that the request makes sense."""
        val = round(HELD_OUT_FRACTION * self.n) if self.val is None else self.val
        test = round(HELD_OUT_FRACTION * self.n) if self.test is None else self.test
        if self.n <= 0 or val < 0 or test < 0:
            raise ValueError(f"--n {self.n}, --val {val}, --test {test}: counts must be positive "
                             "(n > 0, val >= 0, test >= 0)")
        train = self.n - val - test
        if train <= 0:
            raise ValueError(f"--n {self.n} leaves no training images after --val {val} and --test "
                             f"{test}: raise --n or lower --val/--test")
        return {"train": train, "val": val, "test": test}


@dataclass
class ObjectGroup:
    """Objects of one shape and colour: the unit a caption names ("two red circles in the top left")."""

    shape: str  # one of SHAPES
    color: str  # one of COLORS
    count: int  # 1..MAX_COUNT
    size: str  # small | medium | large
    region: str | None  # one of REGIONS, or None (anywhere)


@dataclass
class Scene:
    """Everything that decides one image, its caption and its complexity."""

    groups: list[ObjectGroup]
    background: str  # one of BACKGROUNDS
    background_color: str  # one of COLORS
    pattern_energy: float  # texture energy of the background pattern, in [0, 1]
    pattern: dict = field(default_factory=dict)  # pattern parameters (period, angle, noise amplitude, ...)
    n_specks: int = 0  # small distractor shapes
    n_lines: int = 0  # distractor lines
    grain: float = 0.0  # film-grain standard deviation, 8-bit levels
    template: int = 0  # caption template index

    @property
    def n_objects(self) -> int:
        """Return the number of named objects in the scene."""
        return sum(g.count for g in self.groups)


def scene_complexity(scene: Scene) -> float:
    """Return the ground-truth complexity in [0, 1] of ``scene`` (COMPLEXITY_FORMULA, rounded to 4 places)."""
    objects = (scene.n_objects - 1) / (MAX_OBJECTS - 1)
    clutter = min(1.0, (scene.n_specks + 2 * scene.n_lines) / (MAX_SPECKS + 2 * MAX_LINES))
    texture = min(1.0, scene.pattern_energy + scene.grain / (2 * MAX_GRAIN))
    value = W_OBJECTS * objects + W_CLUTTER * clutter + W_TEXTURE * texture
    return round(min(1.0, max(0.0, value)), 4)


# --------------------------------------------------------------------------------------------- sampling


def _weighted_choice(rng: np.random.Generator, options: list, weights: list[float]):
    w = np.asarray(weights, dtype=np.float64)
    return options[int(rng.choice(len(options), p=w / w.sum()))]


def sample_scene(rng: np.random.Generator) -> Scene:
    """Return a random scene drawn from ``rng``.

    A latent level z in [0, 1] drives every complexity factor at once (more groups, larger counts,
    busier backgrounds, more clutter, more grain as z grows), each with its own noise, so complexities
    cover [0, 1] with no gaps. One scene in five is minimal (one shape on a plain background, complexity
    0): a realistic share of easy images is what lets early exit pay.
    """
    minimal = rng.random() < 0.2
    z = 0.0 if minimal else float(rng.random())

    n_groups = 1 + int(rng.binomial(MAX_GROUPS - 1, z))
    groups: list[ObjectGroup] = []
    used_regions: list[tuple[float, float, float, float]] = []
    used_kinds: set[tuple[str, str]] = set()
    for _ in range(n_groups):
        while True:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            color = list(COLORS)[int(rng.integers(len(COLORS)))]
            if (shape, color) not in used_kinds:
                break
        used_kinds.add((shape, color))
        count = 1 + int(rng.binomial(MAX_COUNT - 1, z))
        sizes = ["small", "medium", "large"] if count == 1 and n_groups == 1 else ["small", "medium"]
        size = sizes[int(rng.integers(len(sizes)))]
        region = None
        if rng.random() < 0.5:
            fits = [name for name, (box, most) in REGIONS.items()
                    if count <= most and (size != "large" or most == 4)
                    and not any(_overlaps(box, other) for other in used_regions)]
            if fits:
                region = fits[int(rng.integers(len(fits)))]
                used_regions.append(REGIONS[region][0])
        groups.append(ObjectGroup(shape, color, count, size, region))

    object_colors = {g.color for g in groups}
    bg_colors = [c for c in COLORS if c not in object_colors]
    background_color = bg_colors[int(rng.integers(len(bg_colors)))]
    if minimal:
        background = "plain"
    else:
        background = _weighted_choice(rng, list(BACKGROUNDS),
                                      [(1 - z) ** 2 + 0.05, 0.4 * (1 - z) + 0.05, 0.5, 0.35, 2 * z * z + 0.05])
    pattern, energy = _sample_pattern(rng, background)

    n_specks = n_lines = 0
    grain = 0.0
    if not minimal:
        if rng.random() < z:
            level = float(np.clip(z + rng.normal(0.0, 0.15), 0.05, 1.0))
            n_specks = int(round(MAX_SPECKS * level * rng.uniform(0.5, 1.0)))
            n_lines = int(round(MAX_LINES * level * rng.uniform(0.0, 1.0)))
        if rng.random() < z:
            grain = round(float(rng.uniform(0.0, MAX_GRAIN * z)), 2)
    return Scene(groups=groups, background=background, background_color=background_color,
                 pattern_energy=energy, pattern=pattern, n_specks=n_specks, n_lines=n_lines, grain=grain,
                 template=int(rng.integers(len(_TEMPLATES))))


def _overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _sample_pattern(rng: np.random.Generator, background: str) -> tuple[dict, float]:
    """Return (pattern parameters, texture energy in [0, 1]) for a background kind."""
    if background == "plain":
        return {}, 0.0
    if background == "gradient":
        return {"angle": round(float(rng.uniform(0, 2 * math.pi)), 4)}, 0.1
    if background == "stripes":
        period = float(rng.uniform(0.05, 0.2))  # stripe period as a fraction of the side
        orientation = ["horizontal", "vertical", "diagonal"][int(rng.integers(3))]
        energy = 0.3 + 0.4 * (0.2 - period) / 0.15
        return {"period": round(period, 4), "orientation": orientation}, round(energy, 4)
    if background == "checker":
        cell = float(rng.uniform(0.06, 0.2))
        energy = 0.4 + 0.35 * (0.2 - cell) / 0.14
        return {"cell": round(cell, 4)}, round(energy, 4)
    if background == "noise":
        amplitude = float(rng.uniform(20, 80))  # peak deviation in 8-bit levels
        block = [1, 2, 4][int(rng.integers(3))]  # noise grain size in pixels at 128 px
        energy = 0.4 + 0.6 * (amplitude - 20) / 60
        return {"amplitude": round(amplitude, 2), "block": block}, round(energy, 4)
    raise ValueError(f"unknown background kind {background!r}; expected one of {BACKGROUNDS}")


# --------------------------------------------------------------------------------------------- captions


def _group_phrase(g: ObjectGroup) -> str:
    noun = g.shape if g.count == 1 else _PLURAL.get(g.shape, g.shape + "s")
    words = [] if g.size == "medium" else [g.size]
    words += [g.color, noun]
    if g.count == 1:
        words.insert(0, "an" if words[0][0] in "aeiou" else "a")
    else:
        words.insert(0, _NUMBER[g.count])
    if g.region:
        words.append(g.region)
    return " ".join(words)


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _clutter_phrase(scene: Scene) -> str:
    load = scene.n_specks + 2 * scene.n_lines
    if load == 0:
        return ""
    if load < 20:
        if scene.n_lines == 0:
            return "with a few specks"
        return "with a few lines" if scene.n_specks == 0 else "with a few specks and lines"
    return "in heavy clutter" if scene.n_lines < 4 else "in heavy clutter with scribbled lines"


_TEMPLATES = (
    "{objects} on a {background} background{clutter}",
    "a picture of {objects} on a {background} background{clutter}",
    "{objects}, {background} background{clutter}",
    "an image showing {objects} on a {background} background{clutter}",
)


def scene_caption(scene: Scene) -> str:
    """Return the caption of ``scene``: every named object, its colour, count, size, place, and the background."""
    clutter = _clutter_phrase(scene)
    text = _TEMPLATES[scene.template].format(
        objects=_join([_group_phrase(g) for g in scene.groups]),
        background=_BACKGROUND_WORD[scene.background].format(c=scene.background_color),
        clutter=(" " + clutter) if clutter else "",
    )
    if scene.grain >= 10:
        text = "a grainy photo: " + text
    return text


def scene_partial_captions(scene: Scene) -> list[str]:
    """Return shorter captions that are also true of ``scene``: the objects alone, and each group alone.

    A trainer that sometimes shows these instead of the full caption learns to bind a colour to the object it
    names (not only to the background) and to answer short queries such as "two red circles".
    """
    background = _BACKGROUND_WORD[scene.background].format(c=scene.background_color)
    phrases = [_group_phrase(g) for g in scene.groups]
    out = [_join(phrases)]
    for p in phrases:
        out += [p, f"{p} on a {background} background"]
    full = scene_caption(scene)
    return [c for c in dict.fromkeys(out) if c != full]


# -------------------------------------------------------------------------------------------- rendering


def _shade(rgb: tuple[int, int, int]) -> np.ndarray:
    """Return the second colour of a two-tone background: darker for light colours, lighter for dark ones."""
    c = np.asarray(rgb, dtype=np.float32)
    luminance = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
    return c * 0.6 if luminance > 110 else c * 0.55 + 255 * 0.45


@functools.lru_cache(maxsize=8)
def _unit_grid(s: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (y, x) pixel-centre coordinates in [0, 1) for an s x s image (cached: every image needs them)."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    return yy, xx


def _render_background(scene: Scene, s: int, rng: np.random.Generator) -> np.ndarray:
    """Return the background as a uint8 (s, s, 3) array."""
    base = np.asarray(COLORS[scene.background_color], dtype=np.uint8)
    kind, p = scene.background, scene.pattern
    if kind == "plain":
        return np.broadcast_to(base, (s, s, 3)).copy()
    if kind == "noise":
        block = max(1, round(p["block"] * s / 128))
        cells = -(-s // block)
        amp = int(round(p["amplitude"]))
        noise = rng.integers(-amp, amp + 1, size=(cells, cells, 1), dtype=np.int16)
        noise = np.repeat(np.repeat(noise, block, axis=0), block, axis=1)[:s, :s]
        return np.clip(base.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    other = _shade(COLORS[scene.background_color])
    yy, xx = _unit_grid(s)
    if kind == "gradient":
        t = (np.cos(p["angle"]) * (xx - 0.5) + np.sin(p["angle"]) * (yy - 0.5)) / math.sqrt(0.5) + 0.5
        t = np.clip(t, 0, 1)[..., None]
        return (base.astype(np.float32) * (1 - t) + other * t).astype(np.uint8)
    if kind == "stripes":
        coord = {"horizontal": yy, "vertical": xx, "diagonal": (xx + yy) / math.sqrt(2)}[p["orientation"]]
        mask = (np.floor(coord / (p["period"] / 2)) % 2) > 0
    elif kind == "checker":
        mask = ((np.floor(xx / p["cell"]) + np.floor(yy / p["cell"])) % 2) > 0
    else:
        raise ValueError(f"unknown background kind {kind!r}; expected one of {BACKGROUNDS}")
    return np.where(mask[..., None], other.astype(np.uint8), base)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in np.radians([45, 135, 225, 315])]
        pts = [(x * 0.85 * math.sqrt(2), y * 0.85 * math.sqrt(2)) for x, y in pts]
    elif shape == "diamond":
        pts = [(0.8 * math.cos(a), math.sin(a)) for a in np.radians([0, 90, 180, 270])]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in np.radians([-90, 30, 150])]
    elif shape == "hexagon":
        pts = [(math.cos(a), math.sin(a)) for a in np.radians(np.arange(0, 360, 60))]
    elif shape == "star":
        pts = [((1.0 if i % 2 == 0 else 0.42) * math.cos(a), (1.0 if i % 2 == 0 else 0.42) * math.sin(a))
               for i, a in enumerate(np.radians(np.arange(-90, 270, 36)))]
    elif shape == "cross":
        w = 0.33
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
               (-1, -w), (-w, -w)]
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float,
                fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, round(r * 0.38)))
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=fill)


def _place(rng: np.random.Generator, box: tuple[float, float, float, float], r: float,
           placed: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Return a centre inside ``box`` (unit coordinates) for radius ``r``, away from already placed objects."""
    x0, y0, x1, y1 = box
    lo_x, hi_x = x0 + r, x1 - r
    lo_y, hi_y = y0 + r, y1 - r
    if lo_x > hi_x:
        lo_x = hi_x = (x0 + x1) / 2
    if lo_y > hi_y:
        lo_y = hi_y = (y0 + y1) / 2
    best, best_gap = (lo_x, lo_y), -math.inf
    for _ in range(24):
        x, y = float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y))
        gap = min((math.hypot(x - px, y - py) - r - pr for px, py, pr in placed), default=math.inf)
        if gap > 0.01:
            return x, y
        if gap > best_gap:
            best, best_gap = (x, y), gap
    return best


def render_scene(scene: Scene, rng: np.random.Generator, image_size: int) -> Image.Image:
    """Return the RGB image of ``scene`` at ``image_size`` pixels; ``rng`` supplies placement and noise."""
    s = image_size
    img = Image.fromarray(_render_background(scene, s, rng), "RGB")
    draw = ImageDraw.Draw(img)
    palette = list(COLORS.values())
    # Clutter goes under the named objects, so the caption stays true.
    for _ in range(scene.n_lines):
        x0, y0, x1, y1 = (rng.uniform(0, s, size=4)).tolist()
        draw.line([x0, y0, x1, y1], fill=palette[int(rng.integers(len(palette)))],
                  width=int(rng.integers(1, 3)) * max(1, round(s / 128)))
    for _ in range(scene.n_specks):
        r = float(rng.uniform(1.5, 3.5)) * s / 128
        x, y = rng.uniform(0, s, size=2).tolist()
        kind = ("circle", "square", "triangle")[int(rng.integers(3))]
        _draw_shape(draw, kind, x, y, r, float(rng.uniform(0, math.pi)), palette[int(rng.integers(len(palette)))])
    placed: list[tuple[float, float, float]] = []
    for g in scene.groups:
        box = REGIONS[g.region][0] if g.region else (0.0, 0.0, 1.0, 1.0)
        for _ in range(g.count):
            r = SIZES[g.size] * float(rng.uniform(0.88, 1.12))
            x, y = _place(rng, box, r, placed)
            placed.append((x, y, r))
            # Small tilt only: a square turned 45 degrees would be a diamond.
            angle = float(rng.uniform(-0.2, 0.2))
            _draw_shape(draw, g.shape, x * s, y * s, r * s, angle, COLORS[g.color])
    if scene.grain > 0:
        # Luminance grain (one value per pixel for all channels): like film, and a third of the cost.
        arr = np.asarray(img, dtype=np.float32)
        arr += rng.standard_normal((s, s, 1), dtype=np.float32) * np.float32(scene.grain)
        img = Image.fromarray(np.clip(arr, 0, 255, out=arr).astype(np.uint8), "RGB")
    return img


# ------------------------------------------------------------------------------------------------ corpus


@dataclass
class DemoSample:
    """One generated image with everything written about it."""

    key: str
    split: str
    shard: int
    jpeg: bytes
    caption: str
    complexity: float
    scene: Scene


def _stream(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_STREAM[split], index])


def scene_of(seed: int, split: str, index: int) -> Scene:
    """Return the scene of sample ``index`` of ``split`` for ``seed`` (without rendering it)."""
    return sample_scene(_stream(seed, split, index))


def make_sample(seed: int, split: str, index: int, image_size: int, jpeg_quality: int, key: str = "",
                shard: int = 0) -> DemoSample:
    """Return sample ``index`` of ``split`` for ``seed``: a pure function of its arguments."""
    rng = _stream(seed, split, index)
    scene = sample_scene(rng)
    img = render_scene(scene, rng, image_size)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=jpeg_quality)
    return DemoSample(key=key, split=split, shard=shard, jpeg=buf.getvalue(), caption=scene_caption(scene),
                      complexity=scene_complexity(scene), scene=scene)


def sample_key(shard_id: int, index_in_shard: int, shard_size: int) -> str:
    """Return img2dataset's key: shard id then index in shard, zero-padded (shard 0, sample 123 -> "000000123")."""
    oom_sample = max(1, math.ceil(math.log10(shard_size)))
    return f"{shard_id * 10 ** oom_sample + index_in_shard:0{OOM_SHARD_COUNT + oom_sample}d}"


def shard_name(shard_id: int) -> str:
    """Return the img2dataset shard name ("00003")."""
    return f"{shard_id:0{OOM_SHARD_COUNT}d}"


def _metadata(sample: DemoSample, image_size: int) -> dict:
    """Return the KEY.json / shard-parquet row: img2dataset's fields plus the scene's generating parameters."""
    sc = sample.scene
    return {
        "url": FAKE_URL.format(split=sample.split, key=sample.key),
        "caption": sample.caption,
        "key": sample.key,
        "status": "success",
        "error_message": None,
        "width": image_size,
        "height": image_size,
        "original_width": image_size,
        "original_height": image_size,
        "exif": None,
        "sha256": hashlib.sha256(sample.jpeg).hexdigest(),
        # Extra columns (img2dataset's save_additional_columns land at the top level the same way).
        "split": sample.split,
        "complexity": sample.complexity,
        "n_objects": sc.n_objects,
        "n_groups": len(sc.groups),
        "n_specks": sc.n_specks,
        "n_lines": sc.n_lines,
        "background": sc.background,
        "pattern_energy": sc.pattern_energy,
        "grain": sc.grain,
    }


_META_SCHEMA = pa.schema([
    ("url", pa.string()), ("caption", pa.string()), ("key", pa.string()), ("status", pa.string()),
    ("error_message", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
    ("original_width", pa.int64()), ("original_height", pa.int64()), ("exif", pa.string()),
    ("sha256", pa.string()), ("split", pa.string()), ("complexity", pa.float64()), ("n_objects", pa.int64()),
    ("n_groups", pa.int64()), ("n_specks", pa.int64()), ("n_lines", pa.int64()), ("background", pa.string()),
    ("pattern_energy", pa.float64()), ("grain", pa.float64()),
])


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """Return a tar archive of ``members`` with the fixed owner/mode/time webdataset's TarWriter would use."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = TAR_MTIME
            info.mode = 0o444
            info.uname = info.gname = "bigdata"
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_shard(samples: list[DemoSample], split_url: str, shard_id: int, image_size: int,
                started: float) -> None:
    """Write one shard as img2dataset does: NNNNN.tar, NNNNN.parquet, then NNNNN_stats.json (the done marker)."""
    name = shard_name(shard_id)
    members: list[tuple[str, bytes]] = []
    rows = []
    for s in samples:
        meta = _metadata(s, image_size)
        rows.append(meta)
        # webdataset's TarWriter writes a sample's files in sorted extension order: jpg, json, txt.
        members += [(f"{s.key}.jpg", s.jpeg),
                    (f"{s.key}.json", json.dumps(meta, indent=4).encode()),
                    (f"{s.key}.txt", s.caption.encode())]
    storage.atomic_write_bytes(storage.join(split_url, f"{name}.tar"), _tar_bytes(members))
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=_META_SCHEMA), buf)
    storage.atomic_write_bytes(storage.join(split_url, f"{name}.parquet"), buf.getvalue())
    ended = time.time()
    stats = {
        "count": len(samples),
        "successes": len(samples),
        "failed_to_download": 0,
        "failed_to_resize": 0,
        "duration": round(ended - started, 4),
        "start_time": started,
        "end_time": ended,
        "status_dict": {"success": len(samples)},
    }
    storage.write_json(stats, storage.join(split_url, f"{name}_stats.json"))


def _write_image_file(url: str, data: bytes) -> None:
    """Write one small image file: rename-into-place locally (no fsync: thousands of files), one PUT elsewhere."""
    fs, path = storage.filesystem(url)
    if storage.is_local(fs):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def _corpus_document(cfg: DemoCorpusConfig, sizes: dict[str, int], shards: dict[str, list[str]],
                     complexity_counts: dict[str, int]) -> dict:
    return {
        "generator": "icar make-demo-corpus",
        "corpus_version": CORPUS_VERSION,
        "command": (f"icar make-demo-corpus --n {cfg.n} --val {sizes['val']} --test {sizes['test']} --seed {cfg.seed} "
                    f"--shard-size {cfg.shard_size} --image-size {cfg.image_size} "
                    f"--jpeg-quality {cfg.jpeg_quality} --complexity-train {cfg.complexity_train} "
                    f"--output {cfg.output}"),
        "seed": cfg.seed,
        "image_size": cfg.image_size,
        "jpeg_quality": cfg.jpeg_quality,
        "shard_size": cfg.shard_size,
        "format": "webdataset (img2dataset layout): NNNNN.tar with KEY.jpg, KEY.txt, KEY.json; NNNNN.parquet; "
                  "NNNNN_stats.json",
        "splits": {name: {"count": sizes[name], "dir": name, "shards": shards[name],
                          "use": use} for name, use in (
            ("train", "training the demo CLIP model and the complexity scorer"),
            ("val", "exit-head training and router calibration"),
            ("test", "held out: quality benchmark and complexity test labels"))},
        "complexity": {
            "formula": COMPLEXITY_FORMULA,
            "weights": {"objects": W_OBJECTS, "clutter": W_CLUTTER, "texture": W_TEXTURE},
            "layout": "IC9600: complexity/images/KEY.jpg, complexity/{train,test}.txt with 'KEY.jpg  score' lines",
            "images": "complexity/images",
            "train_labels": "complexity/train.txt",
            "test_labels": "complexity/test.txt",
            "train_count": complexity_counts["train"],
            "test_count": complexity_counts["test"],
        },
        "scenes": "scenes.parquet",
        "vocabulary": {"shapes": list(SHAPES), "colors": list(COLORS), "sizes": list(SIZES),
                       "regions": list(REGIONS), "backgrounds": list(BACKGROUNDS)},
    }


def make_demo_corpus(cfg: DemoCorpusConfig) -> dict:
    """Generate the corpus described by ``cfg`` under ``cfg.output``; return the corpus.json document."""
    sizes = cfg.split_sizes()
    if cfg.shard_size <= 0 or cfg.image_size < 32:
        raise ValueError(f"--shard-size {cfg.shard_size} / --image-size {cfg.image_size}: need shard size >= 1 "
                         "and image size >= 32")
    n_complexity_train = min(cfg.complexity_train, sizes["train"])
    if n_complexity_train < cfg.complexity_train:
        log.info("complexity/train.txt: %d images (the whole train split; --complexity-train asked for %d)",
                 n_complexity_train, cfg.complexity_train)
    from tqdm import tqdm

    out = cfg.output.rstrip("/")
    storage.makedirs(storage.join(out, "complexity", "images"))
    shards: dict[str, list[str]] = {name: [] for name in SPLITS}
    rows: list[dict] = []
    labels: dict[str, list[str]] = {"train": [], "test": []}
    started = time.time()
    shard_id = 0
    bar = tqdm(total=cfg.n, desc="demo corpus", unit="img", disable=not cfg.progress)
    for split in SPLITS:
        split_url = storage.join(out, split)
        storage.makedirs(split_url)
        for first in range(0, sizes[split], cfg.shard_size):
            shard_started = time.time()
            samples = []
            for i in range(first, min(first + cfg.shard_size, sizes[split])):
                key = sample_key(shard_id, i - first, cfg.shard_size)
                samples.append(make_sample(cfg.seed, split, i, cfg.image_size, cfg.jpeg_quality, key, shard_id))
                bar.update(1)
            write_shard(samples, split_url, shard_id, cfg.image_size, shard_started)
            shards[split].append(f"{split}/{shard_name(shard_id)}.tar")
            for i, s in enumerate(samples, start=first):
                sc = s.scene
                rows.append({"key": s.key, "split": split, "shard": f"{split}/{shard_name(shard_id)}.tar",
                             "caption": s.caption, "partial_captions": scene_partial_captions(sc),
                             "complexity": s.complexity, "n_objects": sc.n_objects,
                             "n_groups": len(sc.groups), "n_specks": sc.n_specks, "n_lines": sc.n_lines,
                             "background": sc.background, "background_color": sc.background_color,
                             "pattern_energy": sc.pattern_energy, "grain": sc.grain})
                if (split == "train" and i < n_complexity_train) or split == "test":
                    _write_image_file(storage.join(out, "complexity", "images", f"{s.key}.jpg"), s.jpeg)
                    labels[split].append(f"{s.key}.jpg  {s.complexity:.4f}")
            shard_id += 1
    bar.close()
    for split, lines in labels.items():
        storage.atomic_write_bytes(storage.join(out, "complexity", f"{split}.txt"),
                                   ("\n".join(lines) + "\n").encode() if lines else b"")
    storage.write_parquet(pa.Table.from_pylist(rows), storage.join(out, "scenes.parquet"))
    doc = _corpus_document(cfg, sizes, shards, {k: len(v) for k, v in labels.items()})
    storage.write_json(doc, storage.join(out, "corpus.json"))
    seconds = time.time() - started
    log.info("demo corpus: %d images in %.1f s (%.0f img/s) -> %s", cfg.n, seconds, cfg.n / max(seconds, 1e-9), out)
    return doc


def config_dict(cfg: DemoCorpusConfig) -> dict:
    """Return ``cfg`` as a plain dict (for cards and logs)."""
    return asdict(cfg)
