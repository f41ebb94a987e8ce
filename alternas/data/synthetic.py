"""Built-in procedurally generated datasets: offline, deterministic by seed, 32x32 RGB.

They probe the paper's claim that MSAs are low-pass (shape-biased) and Convs high-pass (texture-biased) by
putting the label in one frequency band only. Every image is the sum of two components:

* a **low-frequency** component: a soft-edged shape (disk, ring, square, diamond, plus, bars, triangle, two dots,
  hollow square) in a random colour on a random background, jittered in position and size. Edges are sigmoid
  ramps ~1.5 px wide, so almost all of its energy lies below 0.4π (radial, in cycles per pixel × 2π).
* a **high-frequency** component: a sum of plane-wave gratings with frequencies in [0.6π, 0.95π], random phase and
  per-channel amplitude, plus faint white noise.

``shapes``: the label picks the shape (low band); the gratings are random and class-independent.
``textures``: the label picks the grating's (orientation, frequency) pair (high band); the shape is random.

So a model that only sees low frequencies can solve ``shapes`` but not ``textures``, and vice versa.

``cued-shapes`` and ``brightest`` are probes of what an MSA does that a Conv stack followed by an average pool does
not: a match across the image (``cued-shapes``), and a choice among the image's objects by comparing them, which a
softmax over tokens makes in one step (``brightest``). See ``cued_component`` and ``brightest_component``.
"""

from __future__ import annotations

import math

import torch

NUM_CLASSES = 10  # shapes, textures, cued-shapes; brightest has one class per hue (``class_names``)
IMAGE_SIZE = 32
KINDS = ("shapes", "textures", "cued-shapes", "brightest")
SHAPE_NAMES = ("disk", "ring", "square", "diamond", "plus", "h-bar", "v-bar", "triangle", "two-dots", "frame")
# textures: 5 orientations x 2 frequencies (in units of π rad/pixel)
TEXTURE_CLASSES = tuple((angle, freq) for freq in (0.62, 0.88) for angle in (0.0, 36.0, 72.0, 108.0, 144.0))
TEXTURE_NAMES = tuple(f"grating-{int(a)}deg-{f:.2f}pi" for a, f in TEXTURE_CLASSES)
_EDGE = 1.5  # px, width of the soft edge of shapes (keeps the shape component low-pass)
_LOW_RANGE = 0.45  # the low component spans 0.5 ± 0.225, so low + high rarely clips to [0, 1]


def _soft(inside: torch.Tensor) -> torch.Tensor:
    """Signed distance (positive inside, px) -> soft mask in [0, 1]."""
    return torch.sigmoid(inside / (_EDGE / 2))


def _shape_masks(labels: torch.Tensor, gen: torch.Generator, size: int) -> torch.Tensor:
    """(N, size, size) soft masks of the labelled shapes near the centre, jittered in centre and scale."""
    n = labels.numel()
    centre = size / 2 - 0.5 + (torch.rand(n, 2, generator=gen) * 8 - 4)  # ±4 px
    scale = 6.5 + torch.rand(n, generator=gen) * 3.0  # "radius" 6.5-9.5 px
    return shape_masks_at(labels, centre, scale, size)


def shape_masks_at(labels: torch.Tensor, centre: torch.Tensor, scale: torch.Tensor, size: int) -> torch.Tensor:
    """(N, size, size) soft masks of shape ``labels`` centred at ``centre`` (N, 2: row, column) with "radius"
    ``scale`` (N,) px."""
    coords = torch.arange(size, dtype=torch.float32)
    dy = coords.view(1, -1, 1) - centre[:, 0].view(-1, 1, 1)
    dx = coords.view(1, 1, -1) - centre[:, 1].view(-1, 1, 1)
    r = scale.view(-1, 1, 1)
    ax, ay = dx.abs(), dy.abs()
    dist = torch.sqrt(dx**2 + dy**2)
    thick = r * 0.35
    candidates = [
        r - dist,  # disk
        torch.minimum(r - dist, dist - (r - thick)),  # ring
        r * 0.85 - torch.maximum(ax, ay),  # square
        r * 1.15 - (ax + ay),  # diamond
        torch.maximum(torch.minimum(r - ax, thick / 1.2 - ay), torch.minimum(r - ay, thick / 1.2 - ax)),  # plus
        torch.minimum(r * 1.2 - ax, r * 0.4 - ay),  # horizontal bar
        torch.minimum(r * 1.2 - ay, r * 0.4 - ax),  # vertical bar
        torch.minimum(dy + r * 0.7, (r * 0.8 - dy) * 0.5 - ax * 0.9),  # triangle (apex down)
        r * 0.45 - torch.sqrt((ax - r * 0.7) ** 2 + dy**2),  # two dots
        torch.minimum(r * 0.9 - torch.maximum(ax, ay), torch.maximum(ax, ay) - r * 0.45),  # hollow square
    ]
    stacked = torch.stack(candidates, dim=1)  # (N, 10, H, W)
    inside = stacked.gather(1, labels.view(-1, 1, 1, 1).expand(-1, 1, size, size)).squeeze(1)
    return _soft(inside)


def _colours(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground and background colours with at least 0.35 mean contrast."""
    bg = torch.rand(n, 3, generator=gen) * 0.7 + 0.15
    sign = torch.where(bg.mean(1, keepdim=True) > 0.5, -1.0, 1.0)
    fg = (bg + sign * (0.35 + torch.rand(n, 3, generator=gen) * 0.3)).clamp(0.0, 1.0)
    return fg, bg


def low_component(labels: torch.Tensor, gen: torch.Generator, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(N, 3, size, size) float images of the labelled shapes in random colours."""
    mask = _shape_masks(labels, gen, size).unsqueeze(1)
    fg, bg = _colours(labels.numel(), gen)
    image = bg.view(-1, 3, 1, 1) + (fg - bg).view(-1, 3, 1, 1) * mask
    return 0.5 + (image - 0.5) * _LOW_RANGE  # headroom for the gratings: clipping would leak high into low


def high_component(
    angles: torch.Tensor, freqs: torch.Tensor, gen: torch.Generator, size: int = IMAGE_SIZE, amplitude: float = 0.16
) -> torch.Tensor:
    """(N, 3, size, size) zero-mean gratings: one per (angle in degrees, frequency in π rad/px) row of the inputs.

    ``angles``/``freqs`` have shape (N, G): G gratings are summed per image. Per-channel amplitudes are random
    (including sign), so colour carries no label.
    """
    n, g = angles.shape
    coords = torch.arange(size, dtype=torch.float32)
    theta = torch.deg2rad(angles).view(n, g, 1, 1)
    omega = (freqs * math.pi).view(n, g, 1, 1)
    phase = (torch.rand(n, g, 1, 1, generator=gen) * 2 * math.pi)
    wave = torch.cos(omega * (coords.view(1, 1, 1, -1) * torch.cos(theta) + coords.view(1, 1, -1, 1) * torch.sin(theta))
                     + phase)  # (N, G, H, W)
    channel_amp = amplitude * (0.6 + 0.4 * torch.rand(n, g, 3, generator=gen)) * torch.where(
        torch.rand(n, g, 3, generator=gen) < 0.5, -1.0, 1.0)
    return torch.einsum("ngc,nghw->nchw", channel_amp, wave)


# cued-shapes: saturated colours, far apart in hue, for the two objects and the cue
CUE_COLOURS = torch.tensor([[1.0, 0.15, 0.15], [0.15, 0.9, 0.15], [0.2, 0.3, 1.0], [1.0, 0.9, 0.1], [0.9, 0.2, 0.9],
                            [0.1, 0.9, 0.9]])
_CUE_GRID = 3  # objects and cue sit in distinct cells of a 3 x 3 grid: never overlapping, often far apart


def cued_component(labels: torch.Tensor, gen: torch.Generator, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(N, 3, size, size) images of two small shapes of different classes in two different colours, and a small
    square cue in the colour of the one named by ``labels``.

    Which shape is the answer is decided by a match between the cue and an object that may be far from it, so a
    stack of local filters followed by an average pool cannot read it off any one place: it takes a comparison across
    the image, the content-based global mixing an MSA does in one step (and a Conv stack only through depth).
    """
    n = labels.numel()
    other = (labels + 1 + torch.randint(0, NUM_CLASSES - 1, (n,), generator=gen)) % NUM_CLASSES
    cells = torch.stack([torch.randperm(_CUE_GRID**2, generator=gen)[:3] for _ in range(n)])  # answer, other, cue
    cell = size / _CUE_GRID
    centre = torch.stack([(cells // _CUE_GRID).float(), (cells % _CUE_GRID).float()], -1) * cell + cell / 2 - 0.5
    centre = centre + (torch.rand(n, 3, 2, generator=gen) * 2 - 1)  # ±1 px
    colours = torch.stack([torch.randperm(len(CUE_COLOURS), generator=gen)[:2] for _ in range(n)])
    image = (0.45 + 0.1 * torch.rand(n, 1, 1, 1, generator=gen)).expand(n, 3, size, size).clone()
    scale = 4.0 + torch.rand(n, 2, generator=gen)  # "radius" 4-5 px
    square = torch.full((n,), SHAPE_NAMES.index("square"))
    layers = [(labels, 0, scale[:, 0], 0), (other, 1, scale[:, 1], 1), (square, 2, torch.full((n,), 2.0), 0)]
    for shape, j, radius, colour in layers:
        mask = shape_masks_at(shape, centre[:, j], radius, size).unsqueeze(1)
        image = image * (1 - mask) + CUE_COLOURS[colours[:, colour]].view(n, 3, 1, 1) * mask
    return image


# brightest: eight squares, one per cell of a 4 x 4 grid (a 32 px image's stage-4 token each); the label is the hue
# of the brightest. Hues at full brightness (the brightness scales all three channels).
HUES = {"red": (1.0, 0.1, 0.1), "green": (0.1, 1.0, 0.1), "blue": (0.15, 0.3, 1.0), "yellow": (1.0, 0.9, 0.1)}
HUE_NAMES = tuple(HUES)
_SQUARES, _SQUARE_GRID, _SQUARE_SIDE = 8, 4, 6
_GAP = (0.03, 0.06)  # the brightest is brighter than every other square by at least this much (a draw per image)
_SPREAD = 0.08  # ... and each other square is dimmer still by up to this much


def brightest_component(labels: torch.Tensor, gen: torch.Generator, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(N, 3, size, size) images of eight squares on a dark background; the label is the hue of the brightest
    (brightness: the largest channel, which every hue reaches at full scale).

    The brightest square's brightness is drawn per image (0.45-0.95), the seven others are dimmer by 3-6 % of full
    scale plus up to 8 % more, and take any of the four hues, the label's too: so several dimmer squares often share
    a hue, and no fixed threshold finds the brightest. Evidence pooled by hue, what an average pool of per-square
    features gives, is right only if each square's feature grows about exponentially over the whole range (counting
    or summing brightness by hue is right on about half of the images, exp(10·brightness) on ~70 %, exp(20·b) on
    ~96 %; ``tests/test_data.py`` measures it): a dynamic range ReLU features with batch norm reach poorly, though
    the deep stage-4 receptive fields could in principle compare squares another way. An MSA over the stage-4 tokens
    gets the exponential and the normalisation from its softmax: logits linear in brightness, with a slope of ~40
    per unit of it, pick the brightest at every level, and its output is a mix of values of the same scale.

    RandAugment (its colour ops reorder the levels, its translations, shears and rotations can move the brightest
    out of the image), random erasing, mixup and cutmix can change which square is brightest: the dataset declares
    them label-breaking and every recipe leaves them out (``datasets.LABEL_BREAKING``).
    """
    n = labels.numel()
    k = len(HUES)
    hues = torch.cat([labels.view(-1, 1), torch.randint(0, k, (n, _SQUARES - 1), generator=gen)], 1)
    top = 0.45 + 0.5 * torch.rand(n, 1, generator=gen)
    gap = _GAP[0] + (_GAP[1] - _GAP[0]) * torch.rand(n, 1, generator=gen)
    others = top - gap - _SPREAD * torch.rand(n, _SQUARES - 1, generator=gen)
    brightness = torch.cat([top, others], 1)
    cells = torch.rand(n, _SQUARE_GRID**2, generator=gen).argsort(1)[:, :_SQUARES]  # distinct cells
    cell = size // _SQUARE_GRID
    corner = torch.stack([cells // _SQUARE_GRID, cells % _SQUARE_GRID], -1) * cell
    corner = corner + torch.randint(0, cell - _SQUARE_SIDE + 1, (n, _SQUARES, 2), generator=gen)
    colour = torch.tensor(list(HUES.values()))[hues] * brightness.unsqueeze(-1)  # (n, squares, 3)
    image = (0.06 + 0.04 * torch.rand(n, 1, 1, 1, generator=gen)).expand(n, 3, size, size).clone()
    coords = torch.arange(size)
    for j in range(_SQUARES):
        rows = (coords >= corner[:, j, 0:1]) & (coords < corner[:, j, 0:1] + _SQUARE_SIDE)  # (n, size)
        cols = (coords >= corner[:, j, 1:2]) & (coords < corner[:, j, 1:2] + _SQUARE_SIDE)
        inside = (rows.unsqueeze(2) & cols.unsqueeze(1)).unsqueeze(1)  # (n, 1, size, size)
        image = torch.where(inside, colour[:, j].view(n, 3, 1, 1), image)
    return image


# the probes: a component drawn from the labels, and the SD of the faint pixel noise on top
_PROBES = {"cued-shapes": (cued_component, 0.04), "brightest": (brightest_component, 0.02)}
_SEED_OFFSETS = {"shapes": 0, "textures": 1, "cued-shapes": 7919, "brightest": 104729}  # one stream per kind


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def class_names(kind: str) -> tuple[str, ...]:
    """The class names of built-in dataset ``kind``, in label order."""
    return {"textures": TEXTURE_NAMES, "brightest": HUE_NAMES}.get(kind, SHAPE_NAMES)


def generate(
    kind: str, n: int, seed: int, size: int = IMAGE_SIZE, return_components: bool = False
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` images of built-in dataset ``kind`` (one of ``KINDS``) as uint8 (N, 3, size, size) and int64 labels.

    Deterministic in (kind, n, seed, size). With ``return_components`` the float low- and high-frequency
    components are returned too (tests check where each one's energy lies).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic dataset {kind!r}")
    gen = torch.Generator().manual_seed(seed * 2 + _SEED_OFFSETS[kind])
    labels = torch.arange(n) % len(class_names(kind))
    labels = labels[torch.randperm(n, generator=gen)]
    if kind in _PROBES:
        component, noise = _PROBES[kind]
        images = component(labels, gen, size) + noise * torch.randn(n, 3, size, size, generator=gen)
        return _to_uint8(images), labels
    random_labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    if kind == "shapes":
        low = low_component(labels, gen, size)
        angles = torch.rand(n, 2, generator=gen) * 180.0
        freqs = 0.6 + torch.rand(n, 2, generator=gen) * 0.35
        high = high_component(angles, freqs, gen, size, amplitude=0.11)
    else:
        low = low_component(random_labels, gen, size)
        table = torch.tensor(TEXTURE_CLASSES)
        angles = (table[labels, 0] + (torch.rand(n, generator=gen) * 8 - 4)).view(n, 1)
        freqs = (table[labels, 1] + (torch.rand(n, generator=gen) * 0.04 - 0.02)).view(n, 1)
        high = high_component(angles, freqs, gen, size, amplitude=0.22)
    high = high + 0.015 * torch.randn(low.shape, generator=gen)
    images = _to_uint8(low + high)
    if return_components:
        return images, labels, low, high
    return images, labels
