"""Shape world: procedural image-caption data standing in for web-scale CLIP pretraining data and
for a downstream task with covariate-shifted and semantically-shifted test sets.

A small CLIP is pretrained on `pretraining_pairs` (every shape, colour, background and corruption,
with varied captions), then `downstream_benchmark` gives a 10-class task rendered in one narrow
"ID" domain, the same classes in shifted domains (OOD generalisation) and images of other shapes
and of bare textures (OOD detection), mirroring CIFAR-10 / CIFAR-10.1 / STL-10 / SVHN / Textures.

Top to bottom: geometry (signed distance functions, the shape table), attributes (palette, sizes,
backgrounds), the renderer, domains and captions, benchmark assembly. Everything is numpy,
vectorised over images, and a pure function of the seed.
"""
from dataclasses import dataclass
from functools import cache, partial

import numpy as np

# ---------------------------------------------------------------------------------------------
# Geometry. Shapes live in unit coordinates (y up) and just fit in the unit disc, so a shape keeps
# its size attribute and stays inside the image whatever its rotation.
# ---------------------------------------------------------------------------------------------


def _circle(x, y, r, cx=0.0, cy=0.0):
    return np.hypot(x - cx, y - cy) - r


def _polygon(x, y, vertices):
    """Exact signed distance to a simple polygon: negative inside (even-odd rule)."""
    d2 = np.full(np.shape(x), np.inf)
    inside = np.zeros(np.shape(x), bool)
    for a, b in zip(vertices, np.roll(vertices, -1, axis=0)):
        e = b - a
        wx, wy = x - a[0], y - a[1]
        t = np.clip((wx * e[0] + wy * e[1]) / (e @ e), 0.0, 1.0)
        d2 = np.minimum(d2, (wx - e[0] * t) ** 2 + (wy - e[1] * t) ** 2)
        # A ray towards +x crosses this edge iff the edge straddles the point's height and the
        # point lies on the edge's left when the edge points up (right when it points down).
        straddles = (a[1] > y) != (b[1] > y)
        inside ^= straddles & ((e[0] * wy - e[1] * wx > 0) == (e[1] > 0))
    return np.where(inside, -1.0, 1.0) * np.sqrt(d2)


def _fit(vertices):
    """Centre a vertex list's bounding box on the origin and scale it to touch the unit circle."""
    v = np.asarray(vertices, float)
    v = v - (v.min(0) + v.max(0)) / 2
    return v / np.hypot(*v.T).max()


def _polygon_shape(vertices):
    return partial(_polygon, vertices=_fit(vertices))


def _polar(radius, n=128):
    """Vertices of the star-shaped curve `r(theta)`."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = radius(t)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _curve(fx, fy, n=128):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([fx(t), fy(t)], 1)


def _regular(n, phase_deg=90.0):
    t = np.deg2rad(phase_deg) + np.arange(n) * 2 * np.pi / n
    return np.stack([np.cos(t), np.sin(t)], 1)


def _star(points, inner):
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    t = np.pi / 2 + np.arange(2 * points) * np.pi / points
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


# name -> signed distance `f(x, y)` in unit coordinates, negative inside.
SHAPES = {
    "circle": lambda x, y: _circle(x, y, 1.0),
    "square": _polygon_shape([(-1, -1), (1, -1), (1, 1), (-1, 1)]),
    "triangle": _polygon_shape(_regular(3)),
    "star": _polygon_shape(_star(5, 0.42)),
    "plus": _polygon_shape([(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3),
                            (0.3, 1), (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)]),
    "heart": _polygon_shape(_curve(lambda t: 16 * np.sin(t) ** 3,
                                   lambda t: 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t)
                                   - np.cos(4 * t))),
    "hexagon": _polygon_shape(_regular(6, 0.0)),
    "ring": lambda x, y: np.abs(_circle(x, y, 0.72)) - 0.28,
    "crescent": lambda x, y: np.maximum(_circle(x, y, 1.0), -_circle(x, y, 0.8, 0.45, 0.17)),
    "diamond": _polygon_shape([(0, -1), (0.62, 0), (0, 1), (-0.62, 0)]),
    "pentagon": _polygon_shape(_regular(5)),
    "octagon": _polygon_shape(_regular(8, 22.5)),
    "rectangle": _polygon_shape([(-1, -0.5), (1, -0.5), (1, 0.5), (-1, 0.5)]),
    "ellipse": _polygon_shape(_curve(np.cos, lambda t: 0.55 * np.sin(t))),
    "arrow": _polygon_shape([(-1, -0.22), (0.15, -0.22), (0.15, -0.6), (1, 0), (0.15, 0.6),
                             (0.15, 0.22), (-1, 0.22)]),
    "semicircle": _polygon_shape(_curve(np.cos, lambda t: np.maximum(np.sin(t), 0))),
    "trapezoid": _polygon_shape([(-1, -0.6), (1, -0.6), (0.45, 0.6), (-0.45, 0.6)]),
    "lightning bolt": _polygon_shape([(0.2, 1), (-0.55, -0.1), (-0.05, -0.1), (-0.3, -1),
                                      (0.55, 0.22), (0.05, 0.22), (0.35, 1)]),
    "hourglass": _polygon_shape([(-0.8, 1), (0.8, 1), (0.12, 0), (0.8, -1), (-0.8, -1), (-0.12, 0)]),
    "chevron": _polygon_shape([(-1, -0.3), (0, 0.6), (1, -0.3), (1, -0.9), (0, 0.0), (-1, -0.9)]),
    "flower": _polygon_shape(_polar(lambda t: 0.5 + 0.5 * np.abs(np.cos(2.5 * t - np.pi / 4)))),
    "teardrop": _polygon_shape(_curve(lambda t: np.sin(t) * np.abs(np.sin(t / 2)) ** 1.5,
                                      lambda t: np.cos(t))),
    "house": _polygon_shape([(-0.75, -1), (0.75, -1), (0.75, 0.1), (0, 1), (-0.75, 0.1)]),
    "parallelogram": _polygon_shape([(-1, -0.5), (0.4, -0.5), (1, 0.5), (-0.4, 0.5)]),
}
SHAPE_NAMES = tuple(SHAPES)

# The downstream task: easy shapes (star, plus, heart) next to confusable ones (circle / hexagon /
# ring, square / diamond). Names start with a consonant so "a photo of a {shape}" reads right.
ID_CLASSES = ("circle", "square", "triangle", "star", "plus", "heart", "hexagon", "ring", "crescent",
              "diamond")
OOD_CLASSES = tuple(s for s in SHAPE_NAMES if s not in ID_CLASSES)

# Distance tables cover [-1.4, 1.4]^2. Pixels beyond are clamped to the border, where every shape
# is >= 0.4 away: more than half a pixel plus half a stroke even for the smallest shape at the
# smallest resolution, so clamping never paints a stray pixel.
ATLAS_HALF_WIDTH = 1.4


def _atlas_size(resolution: int) -> int:
    """Table side giving about a third of a pixel per cell for the largest shape at `resolution`.

    Not finer: the lookups are bound by cache misses, and a table that fits in cache is what
    makes rendering fast.
    """
    return 4 * resolution


@cache
def _atlas(size: int) -> np.ndarray:
    """Every shape's signed distance sampled once on a grid, `[K, size, size]`, indexed `[k, y, x]`.

    Rendering then costs one bilinear lookup per pixel whatever the shape's complexity.
    """
    grid = np.linspace(-ATLAS_HALF_WIDTH, ATLAS_HALF_WIDTH, size)
    x, y = np.meshgrid(grid, grid, indexing="xy")
    return np.stack([SHAPES[name](x, y) for name in SHAPE_NAMES]).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Attributes.
# ---------------------------------------------------------------------------------------------
COLOURS = {
    "red": (0.86, 0.1, 0.1), "orange": (1.0, 0.55, 0.05), "yellow": (0.98, 0.9, 0.1),
    "green": (0.1, 0.7, 0.15), "cyan": (0.1, 0.85, 0.9), "blue": (0.1, 0.25, 0.9),
    "purple": (0.55, 0.15, 0.8), "pink": (1.0, 0.5, 0.75), "brown": (0.5, 0.3, 0.1),
    "white": (1.0, 1.0, 1.0), "gray": (0.45, 0.45, 0.45), "black": (0.0, 0.0, 0.0),
}
COLOUR_NAMES = tuple(COLOURS)
_COLOUR_TABLE = np.array([COLOURS[c] for c in COLOUR_NAMES], np.float32)
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)

# Radius of the disc a shape fits in, as a fraction of the image side.
SIZES = {"small": (0.2, 0.25), "medium": (0.27, 0.33), "large": (0.35, 0.42)}
SIZE_NAMES = tuple(SIZES)
MAX_ROTATION_DEG = 30.0  # small enough that a rotated square never looks like a diamond
OUTLINE_WIDTH = 1 / 18  # stroke width of outlined shapes, as a fraction of the image side
# Least gap between a shape (stroke included) and the image edge, as a fraction of the side: one
# pixel at 32 px, so that anti-aliasing never reaches the border pixels.
MARGIN = 1 / 32
MIN_RESOLUTION = 16

# Adjectives, as they appear in captions ("on a striped background", "a striped pattern").
BACKGROUNDS = ("plain", "gradient", "striped", "checkered", "noisy")


def _pattern(kind: str, n: int, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """Blend weights `[n, R, R]` in [0, 1] between a background's two colours."""
    r = resolution
    if kind == "plain":
        return np.zeros((n, r, r), np.float32)
    p = (np.arange(r, dtype=np.float32) - (r - 1) / 2) / r
    x, y = p[None, None, :], p[None, :, None]
    angle = rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype(np.float32)
    cos, sin = np.cos(angle), np.sin(angle)
    along = cos * x + sin * y  # coordinate along a random direction, 0 at the centre
    across = cos * y - sin * x
    if kind == "gradient":
        return np.broadcast_to(0.5 + along / (np.abs(cos) + np.abs(sin)), (n, r, r)).copy()
    # Periods in pixels scale with the resolution so that a pattern looks the same at 32 and 64.
    period = rng.uniform(4, 8, (n, 1, 1)).astype(np.float32) / 32
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype(np.float32)
    # Slope of the square wave's edge: one pixel wide, so stripes are anti-aliased, not jagged.
    sharp = period * r / (2 * np.pi)
    if kind == "striped":
        return np.clip(0.5 + sharp * np.sin(2 * np.pi * along / period + phase), 0, 1)
    if kind == "checkered":
        wave = np.sin(2 * np.pi * along / period + phase) * np.sin(2 * np.pi * across / period + phase)
        return np.clip(0.5 + sharp * wave, 0, 1)
    if kind == "noisy":
        # Smooth value noise (a coarse random grid, bilinearly upsampled) plus pixel grain.
        coarse = rng.random((n, 6, 6), dtype=np.float32)
        up = _linear_upsampler(6, r)
        smooth = np.einsum("ia,nab,jb->nij", up, coarse, up, optimize=True)
        grain = rng.standard_normal((n, r, r), dtype=np.float32) * 0.15
        return np.clip(smooth + grain, 0, 1)
    raise ValueError(f"unknown background {kind!r}; choose one of {BACKGROUNDS}")


def _linear_upsampler(size: int, resolution: int) -> np.ndarray:
    """`[resolution, size]` matrix that linearly interpolates `size` samples onto `resolution`."""
    pos = np.clip((np.arange(resolution) + 0.5) * size / resolution - 0.5, 0, size - 1)
    lo = np.minimum(pos.astype(int), size - 2)
    w = np.zeros((resolution, size), np.float32)
    w[np.arange(resolution), lo] = 1 - (pos - lo)
    w[np.arange(resolution), lo + 1] = pos - lo
    return w


LEGIBILITY = 0.3  # least luminance gap between a shape and any background colour behind it


def _background_colours(ink: np.ndarray, drawn: np.ndarray, contrast: tuple[float, float],
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two background colours `[n, 3]` per image whose luminances differ by a step in `contrast`.

    Behind a shape (`drawn`) both stay on the far side of the `ink` colour's luminance, at least
    `LEGIBILITY` away, so that no shape is unlabellable; without one any luminance goes.
    """
    n = len(ink)
    luma = ink @ _LUMA
    on_dark = luma >= 0.5
    lo = np.where(drawn & ~on_dark, luma + LEGIBILITY, 0.0)
    hi = np.where(drawn & on_dark, luma - LEGIBILITY, 1.0)
    step = np.minimum(rng.uniform(*contrast, n), hi - lo)
    darker = lo + rng.random(n) * (hi - lo - step)
    swap = rng.random(n) < 0.5  # which colour is the stripe and which the gap
    tint = rng.uniform(-0.12, 0.12, (n, 3))  # shared by both colours: a hue, not a second step
    first, second = np.where(swap, darker + step, darker), np.where(swap, darker, darker + step)
    return tuple(np.clip(level[:, None] + tint, 0, 1).astype(np.float32) for level in (first, second))


# ---------------------------------------------------------------------------------------------
# Renderer.
# ---------------------------------------------------------------------------------------------
def shape_coverage(shape_ids: np.ndarray, centres: np.ndarray, scales: np.ndarray, angles: np.ndarray,
                   outlined: np.ndarray, resolution: int) -> np.ndarray:
    """Anti-aliased coverage `[n, R, R]` in [0, 1] of one shape per image.

    `shape_ids` index `SHAPE_NAMES`; `centres` `[n, 2]` (x right, y down) and `scales` (the radius
    of the unit disc the shape fits in) are fractions of the image side; `angles` are in radians,
    counter-clockwise; `outlined` draws a stroke `OUTLINE_WIDTH` wide centred on the boundary.
    Coverage is `clamp(0.5 - distance_in_pixels, 0, 1)`: a one-pixel box filter across the edge,
    exact for axis-aligned edges and within 0.05 otherwise, so no supersampling is needed.
    """
    size = _atlas_size(resolution)
    flat = _atlas(size).reshape(-1)
    r = resolution
    p = (np.arange(r, dtype=np.float32) + 0.5) / r
    dx = p[None, None, :] - centres[:, 0, None, None].astype(np.float32)
    dy = centres[:, 1, None, None].astype(np.float32) - p[None, :, None]  # y up
    cells = ((size - 1) / (2 * ATLAS_HALF_WIDTH) / scales)[:, None, None]
    cos, sin = (np.cos(angles)[:, None, None] * cells).astype(np.float32), \
        (np.sin(angles)[:, None, None] * cells).astype(np.float32)
    # Table coordinates of every pixel; turning the pixel grid by -angle turns the shape by +angle.
    mid = np.float32((size - 1) / 2)
    gx = np.clip(cos * dx + sin * dy + mid, 0, size - 1.001)
    gy = np.clip(cos * dy - sin * dx + mid, 0, size - 1.001)
    x0, y0 = gx.astype(np.intp), gy.astype(np.intp)
    fx, fy = gx - x0, gy - y0
    corner = y0 * size + x0 + shape_ids.astype(np.intp)[:, None, None] * size * size
    v00, v01 = np.take(flat, corner), np.take(flat, corner + 1)
    corner += size
    v10, v11 = np.take(flat, corner), np.take(flat, corner + 1)
    top = v00 + fx * (v01 - v00)
    distance = top + fy * (v10 + fx * (v11 - v10) - top)
    distance *= (scales * r).astype(np.float32)[:, None, None]  # unit coordinates -> pixels
    if outlined.any():
        half_stroke = np.float32(OUTLINE_WIDTH * r / 2)
        distance = np.where(outlined[:, None, None], np.abs(distance) - half_stroke, distance)
    return np.clip(0.5 - distance, 0, 1)


def _blur_last_axis(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Convolve along the last axis with an odd-length kernel, replicating the edge pixels."""
    r = len(taps) // 2
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(r, r)], mode="edge")
    return sum(w * padded[..., i:i + x.shape[-1]] for i, w in enumerate(taps))


@dataclass(frozen=True)
class Corruption:
    """Camera-style degradation: gaussian blur, contrast pulled towards the image mean, noise.

    `blur_sigma` is in pixels at 32 px and scales with the resolution.
    """
    blur_sigma: float = 0.8
    contrast: float = 0.55
    noise_std: float = 0.06

    def __call__(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Degrade float images `[n, 3, R, R]`."""
        sigma = self.blur_sigma * images.shape[-1] / 32
        radius = max(1, int(np.ceil(2.5 * sigma)))
        taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
        taps = (taps / taps.sum()).astype(np.float32)
        images = _blur_last_axis(_blur_last_axis(images, taps).swapaxes(-1, -2), taps).swapaxes(-1, -2)
        mean = images.mean(axis=(1, 2, 3), keepdims=True)
        images = mean + self.contrast * (images - mean)
        return images + self.noise_std * rng.standard_normal(images.shape, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Domains: which attributes a set of images draws from, and the scenes drawn from them.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Domain:
    """Where the attributes of a rendered image come from.

    `pattern_contrast` bounds the luminance step between a background's two colours.
    """
    colours: tuple[str, ...]
    backgrounds: tuple[str, ...]
    outline_prob: float = 0.0
    corruption: Corruption | None = None
    corruption_prob: float = 1.0
    pattern_contrast: tuple[float, float] = (0.15, 0.35)


_ID_COLOURS = ("red", "green", "blue", "yellow", "purple")
DOMAINS = {
    # The downstream task's own distribution.
    "id": Domain(_ID_COLOURS, ("plain", "gradient")),
    # Covariate shifts over the same classes: new palette on textured backgrounds; a degraded
    # camera; line drawings (the analogue of ImageNet-Sketch).
    "texture": Domain(("orange", "cyan", "pink", "white", "brown"), ("striped", "checkered", "noisy")),
    "corrupted": Domain(_ID_COLOURS, ("plain", "gradient"), corruption=Corruption()),
    "sketch": Domain(("black", "gray"), ("plain",), outline_prob=1.0),
    # Pretraining sees everything, as a web-scale CLIP has seen all of the above.
    "pretrain": Domain(COLOUR_NAMES, BACKGROUNDS, outline_prob=0.3, corruption=Corruption(),
                       corruption_prob=0.15),
    # Bare patterns, bolder than the backgrounds behind shapes (the analogue of Textures / DTD).
    "patterns": Domain(COLOUR_NAMES, ("striped", "checkered", "noisy"), pattern_contrast=(0.35, 0.7)),
}
COVARIATE_DOMAINS = ("texture", "corrupted", "sketch")
_CHUNK_PIXELS = 1 << 16  # pixels per vectorised step: temporaries and distance tables stay in cache


@dataclass
class _Scene:
    """Per-image attributes, all drawn before any pixel is rendered."""
    shape: np.ndarray  # index into SHAPE_NAMES, -1 for a texture-only image
    size: np.ndarray  # index into SIZE_NAMES
    colour: np.ndarray  # index into COLOUR_NAMES
    background: np.ndarray  # index into BACKGROUNDS
    outlined: np.ndarray
    corrupted: np.ndarray
    scale: np.ndarray  # see `shape_coverage` for the geometry
    centre: np.ndarray
    angle: np.ndarray
    backdrop: tuple[np.ndarray, np.ndarray]  # the background's two colours, [n, 3] each


def _draw_scene(shape: np.ndarray, domain: Domain, rng: np.random.Generator) -> _Scene:
    n = len(shape)
    size = rng.integers(0, len(SIZE_NAMES), n)
    palette = np.array([COLOUR_NAMES.index(c) for c in domain.colours])
    colour = palette[rng.integers(0, len(palette), n)]
    lo, hi = np.array(list(SIZES.values())).T
    scale = rng.uniform(lo[size], hi[size])
    return _Scene(
        shape=shape,
        size=size,
        colour=colour,
        background=np.array([BACKGROUNDS.index(b) for b in domain.backgrounds])[
            rng.integers(0, len(domain.backgrounds), n)],
        outlined=(rng.random(n) < domain.outline_prob) & (shape >= 0),
        corrupted=(rng.random(n) < domain.corruption_prob) & (domain.corruption is not None),
        scale=scale,
        centre=0.5 + rng.uniform(-1, 1, (n, 2)) * (0.5 - scale - OUTLINE_WIDTH / 2 - MARGIN)[:, None],
        angle=np.deg2rad(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, n)),
        backdrop=_background_colours(_COLOUR_TABLE[colour], shape >= 0, domain.pattern_contrast, rng),
    )


def _paint(scene: _Scene, domain: Domain, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """Render a scene to uint8 `[n, 3, R, R]`, a cache-sized chunk of images at a time."""
    n, r = len(scene.shape), resolution
    chunk = max(1, _CHUNK_PIXELS // r ** 2)
    out = np.empty((n, 3, r, r), np.uint8)
    for start in range(0, n, chunk):
        part = slice(start, min(start + chunk, n))
        weight = np.empty((part.stop - start, r, r), np.float32)
        for b, kind in enumerate(BACKGROUNDS):
            mine = scene.background[part] == b
            if mine.any():
                weight[mine] = _pattern(kind, int(mine.sum()), r, rng)
        c0, c1 = (c[part, :, None, None] for c in scene.backdrop)
        image = c0 + weight[:, None] * (c1 - c0)
        shape = scene.shape[part]
        # Texture-only images (shape -1) are drawn as shape 0 at zero opacity: cheaper than masking.
        cover = shape_coverage(np.maximum(shape, 0), scene.centre[part], scene.scale[part], scene.angle[part],
                               scene.outlined[part], r) * (shape >= 0)[:, None, None]
        ink = _COLOUR_TABLE[scene.colour[part], :, None, None]
        image += cover[:, None] * (ink - image)
        hit = scene.corrupted[part]
        if hit.any():
            image[hit] = domain.corruption(image[hit], rng)
        out[part] = np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)
    return out


# ---------------------------------------------------------------------------------------------
# Captions.
# ---------------------------------------------------------------------------------------------
def _a(phrase: str) -> str:
    """The phrase with its indefinite article: "a star", "an orange star"."""
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _describe(scene: _Scene, i: int, with_size=True, with_colour=True, with_background=True,
              prefix="a photo of") -> str:
    """"a photo of a small outlined red star on a striped background", parts optional."""
    words = [SIZE_NAMES[scene.size[i]]] if with_size else []
    words += ["outlined"] if scene.outlined[i] else []
    words += [COLOUR_NAMES[scene.colour[i]]] if with_colour else []
    words.append(SHAPE_NAMES[scene.shape[i]])
    if scene.corrupted[i]:
        prefix = "a blurry photo of"
    text = f"{prefix} {_a(' '.join(words))}" if prefix else _a(" ".join(words))
    if with_background:
        text += f" on {_a(BACKGROUNDS[scene.background[i]])} background"
    return text


_PREFIXES = ("a photo of", "a picture of", "an image of", "a rendering of", "")
BARE_PROMPT_FRACTION = 0.25  # share of shape captions that are exactly "a photo of a {shape}"


def _varied_captions(scene: _Scene, rng: np.random.Generator) -> list[str]:
    """Pretraining captions: each attribute mentioned or not, several phrasings."""
    n = len(scene.shape)
    mention = rng.random((n, 3)) < (0.5, 0.6, 0.4)  # size, colour, background
    bare = rng.random(n) < BARE_PROMPT_FRACTION
    prefix = rng.integers(0, len(_PREFIXES), n)
    as_pattern = rng.random(n) < 0.5
    drawn_as = rng.integers(0, 3, n)  # an outlined shape: described, "a sketch of", "a drawing of"
    captions = []
    for i in range(n):
        if scene.shape[i] < 0:
            kind = BACKGROUNDS[scene.background[i]]
            captions.append(f"a photo of {_a(kind)} pattern" if as_pattern[i] else f"{_a(kind)} texture")
        elif bare[i]:
            # Outlined and blurred shapes too: the web captions a sketch of a star "a star", and it
            # is this pairing that teaches the class prompt every domain the evaluation uses.
            captions.append(f"a photo of {_a(SHAPE_NAMES[scene.shape[i]])}")
        elif scene.outlined[i] and drawn_as[i]:
            captions.append(f"a {('sketch', 'drawing')[drawn_as[i] - 1]} of {_a(SHAPE_NAMES[scene.shape[i]])}")
        else:
            captions.append(_describe(scene, i, *mention[i], prefix=_PREFIXES[prefix[i]]))
    return captions


# ---------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------
def _check(n: int, resolution: int):
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if resolution < MIN_RESOLUTION:
        raise ValueError(f"resolution must be >= {MIN_RESOLUTION} pixels for shapes to be legible, "
                         f"got {resolution}")


def _balanced(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` labels in [0, k) in random order, each class within one of `n / k` times."""
    return rng.permutation(np.arange(n) % k)


def render(classes, n: int, seed: int, resolution: int = 32,
           domain: str = "id") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Render `n` images of `classes` (names from `SHAPE_NAMES`), balanced over the classes.

    Returns uint8 images `[n, 3, R, R]`, int64 labels `[n]` indexing `classes`, and one full
    caption per image ("a photo of a large red star on a plain background"). Same arguments,
    same bytes.
    """
    _check(n, resolution)
    if isinstance(classes, str):
        raise ValueError(f"classes must be a sequence of shape names, got the string {classes!r}")
    unknown = [c for c in classes if c not in SHAPES]
    if unknown or not classes:
        raise ValueError(f"unknown shape classes {unknown or 'none given'}; choose from {SHAPE_NAMES}")
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose one of {tuple(DOMAINS)}")
    rng = np.random.default_rng([seed, 1])
    labels = _balanced(len(classes), n, rng)
    ids = np.array([SHAPE_NAMES.index(c) for c in classes])[labels]
    scene = _draw_scene(ids, DOMAINS[domain], rng)
    images = _paint(scene, DOMAINS[domain], resolution, rng)
    return images, labels.astype(np.int64), [_describe(scene, i) for i in range(n)]


def render_textures(n: int, seed: int, resolution: int = 32) -> tuple[np.ndarray, list[str]]:
    """Images with no object, only a background pattern (the analogue of the Textures set)."""
    _check(n, resolution)
    rng = np.random.default_rng([seed, 2])
    domain = DOMAINS["patterns"]
    scene = _draw_scene(np.full(n, -1), domain, rng)
    images = _paint(scene, domain, resolution, rng)
    return images, [f"a photo of {_a(BACKGROUNDS[b])} pattern" for b in scene.background]


TEXTURE_FRACTION = 0.05  # share of pretraining images that show a pattern and no shape


def pretraining_pairs(n: int, seed: int, resolution: int = 32) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Image-caption pairs over every shape, colour, background and corruption.

    Returns uint8 images `[n, 3, R, R]`, int64 labels `[n]` indexing `SHAPE_NAMES` (-1 for the
    texture-only images) and varied captions. The downstream task's classes and its OOD classes
    are all in here, as a web-scale CLIP has seen them all.
    """
    _check(n, resolution)
    rng = np.random.default_rng([seed, 0])
    ids = _balanced(len(SHAPE_NAMES), n, rng)
    ids[rng.random(n) < TEXTURE_FRACTION] = -1
    domain = DOMAINS["pretrain"]
    scene = _draw_scene(ids, domain, rng)
    images = _paint(scene, domain, resolution, rng)
    return images, ids.astype(np.int64), _varied_captions(scene, rng)


def downstream_benchmark(seed: int = 0, resolution: int = 32, n_train: int = 5000, n_val: int = 1000,
                         n_test: int = 2000, n_shift: int = 2000, n_ood: int = 2000) -> dict:
    """The downstream task over `ID_CLASSES` with its shifted test sets.

    Returns a dict with `classnames` (the class names for "a photo of a {classname}"),
    `train` / `val` / `test` as (uint8 images `[N, 3, R, R]`, int64 labels) from the ID domain,
    `covariate` {name: (images, labels)} for every `COVARIATE_DOMAINS` entry (same labels as ID),
    and `semantic` {"shapes": images of `OOD_CLASSES`, "textures": images with no shape}. Every
    split is drawn from its own seed stream, so the splits are independent draws, and none
    shares a stream with `pretraining_pairs`.
    """
    streams = np.random.SeedSequence([seed, 3]).generate_state(5 + len(COVARIATE_DOMAINS))
    split = iter(int(s) for s in streams)

    def task(n, domain):
        return render(ID_CLASSES, n, next(split), resolution, domain)[:2]

    return {
        "classnames": list(ID_CLASSES),
        "train": task(n_train, "id"),
        "val": task(n_val, "id"),
        "test": task(n_test, "id"),
        "covariate": {name: task(n_shift, name) for name in COVARIATE_DOMAINS},
        "semantic": {"shapes": render(OOD_CLASSES, n_ood, next(split), resolution)[0],
                     "textures": render_textures(n_ood, next(split), resolution)[0]},
    }


def contact_sheet(images: np.ndarray, columns: int, gap: int = 1) -> np.ndarray:
    """Tile uint8 images `[N, 3, H, W]` row-major into one uint8 HWC picture on white."""
    n, _, h, w = images.shape
    rows = -(-n // columns)
    sheet = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap, 3), 255, np.uint8)
    for i, image in enumerate(images):
        top, left = divmod(i, columns)
        top, left = top * (h + gap), left * (w + gap)
        sheet[top:top + h, left:left + w] = image.transpose(1, 2, 0)
    return sheet


def sample_sheet(seed: int = 0, resolution: int = 32) -> np.ndarray:
    """A contact sheet with one row per set: ID, each covariate domain, OOD shapes, textures and
    pretraining pairs. ID and covariate rows show every class twice, in class order.
    `python -m reprogrammer.shapeworld OUT.png [RESOLUTION]` writes one, magnified."""
    columns = 2 * len(ID_CLASSES)
    rows = []
    for domain in ("id", *COVARIATE_DOMAINS):
        images, labels, _ = render(ID_CLASSES, columns, seed, resolution, domain)
        by_class = images[np.argsort(labels, kind="stable")]
        rows.append(np.concatenate([by_class[0::2], by_class[1::2]]))
    images, labels, _ = render(OOD_CLASSES, len(OOD_CLASSES), seed, resolution)
    rows.append(images[np.argsort(labels)])
    rows.append(render_textures(columns, seed, resolution)[0])
    rows.append(pretraining_pairs(columns, seed, resolution)[0])
    blank = np.full((1, 3, resolution, resolution), 255, np.uint8)
    padded = [np.concatenate([row, blank.repeat(columns - len(row) % columns, 0)]) if len(row) % columns
              else row for row in rows]
    return contact_sheet(np.concatenate(padded), columns, gap=2)

