"""Generated street scenes with Cityscapes label and instance ids (the embedded dataset's
pictures; ``synth.py`` writes them as a tree).

A scene, back to front: sky (gradient, clouds) above a skyline of buildings (facades with
window grids) down to the horizon; road (asphalt, dashed lane marks) in a perspective wedge,
sidewalk (tiles, curb) on both sides; then, far to near, trees (vegetation: speckled crowns on
trunks), poles, people on the sidewalks, cars on the road (rear views: cabin, wheels, lights,
a license plate) and ``static`` clutter, each sized by its distance to the horizon; last the
ego vehicle's hood, an ``out of roi`` frame and rectification-border corners. Colours overlap
between classes on purpose (grey cars and poles on grey asphalt and facades, green cars and
clothes beside trees, autumn trees, any-colour buildings), so texture, shape and position
decide. Ignored ids appear as in the real data: ego vehicle, rectification border, out of roi,
static. License plates are painted in the image but labelled car: ``json2labelImg`` skips
polygons with a negative id (license plate, −1), leaving the car's id under them. Label ids
and ``hasInstances`` come from ``cityscapesscripts``; instance ids are ``id·1000 + k`` for the
classes with instances, the label id elsewhere, as ``json2instanceImg`` writes them.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from cityscapesscripts.helpers.labels import name2label
from PIL import Image


def _id(name: str) -> int:
    return name2label[name].id


@dataclass
class Scene:
    """The three layers being painted; ``depth`` = 0 at the horizon, 1 at the image bottom."""
    image: np.ndarray        # [H, W, 3] float32, 0…255
    label: np.ndarray        # [H, W] uint8 label ids
    instance: np.ndarray     # [H, W] uint16 instance ids
    horizon: int
    rng: np.random.Generator
    instances: dict[int, int]

    @property
    def height(self) -> int:
        return self.label.shape[0]

    @property
    def width(self) -> int:
        return self.label.shape[1]

    def paint(self, mask: np.ndarray, colours: np.ndarray, name: str, box=None) -> None:
        """Paint ``mask`` (within ``box`` = (top, bottom, left, right) if given) with
        ``colours`` (broadcastable to [h, w, 3]) and the class ``name``; a class with instances
        gets the next instance id of its class."""
        top, bottom, left, right = box or (0, self.height, 0, self.width)
        view = (slice(top, bottom), slice(left, right))
        label = name2label[name]
        colours = np.broadcast_to(colours, mask.shape + (3,))
        self.image[view][mask] = colours[mask]
        self.label[view][mask] = label.id
        if label.hasInstances:
            k = self.instances.get(label.id, 0)
            self.instances[label.id] = k + 1
            self.instance[view][mask] = label.id * 1000 + k
        else:
            self.instance[view][mask] = label.id

    def depth(self, y: float) -> float:
        return float(np.clip((y - self.horizon) / (self.height - self.horizon), 0.0, 1.0))


# ---- textures --------------------------------------------------------------------------------

def smooth_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """[H, W] float32 noise in about −1…1, varying over ``cell`` pixels (bilinear upsampling)."""
    grid = rng.uniform(-1, 1, (max(2, int(height / cell) + 2), max(2, int(width / cell) + 2)))
    return np.asarray(Image.fromarray(grid.astype(np.float32))
                      .resize((width, height), Image.Resampling.BILINEAR))


def hsv_colour(rng: np.random.Generator, hue=(0.0, 1.0), sat=(0.0, 1.0), val=(0.0, 1.0)):
    """An RGB colour (0…255) from a hue / saturation / value drawn in the given ranges."""
    rgb = colorsys.hsv_to_rgb(rng.uniform(*hue) % 1.0, rng.uniform(*sat), rng.uniform(*val))
    return np.asarray(rgb, np.float32) * 255


def grain(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    return rng.normal(0.0, sigma, shape + (1,)).astype(np.float32)


# ---- background: sky, buildings, ground ------------------------------------------------------

def _sky(s: Scene) -> None:
    h, w, rng = s.height, s.width, s.rng
    top = hsv_colour(rng, (0.55, 0.62), (0.2, 0.6), (0.6, 0.95))
    low = np.minimum(top + rng.uniform(30, 70), 255)
    ramp = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    clouds = np.clip(smooth_noise(rng, h, w, rng.uniform(8, 20)), 0, 1)[..., None]
    colours = top * (1 - ramp) + low * ramp
    colours = colours + clouds * (235 - colours) * rng.uniform(0.3, 0.9)
    s.paint(np.ones((h, w), bool), colours, "sky")


def _buildings(s: Scene) -> None:
    h, w, rng = s.height, s.width, s.rng
    x = int(rng.integers(-w // 8, 0))
    while x < w:
        bw = int(rng.uniform(0.12, 0.35) * w)
        top = int(rng.uniform(0.05, 0.8) * s.horizon)
        left, right = max(x, 0), min(x + bw, w)
        x += bw
        if right <= left:
            continue
        bh = s.horizon - top
        base = hsv_colour(rng, sat=(0.0, 0.45), val=(0.3, 0.85))
        window = hsv_colour(rng, (0.5, 0.7), (0.0, 0.4), (0.05, 0.45))
        period = max(3, int(rng.uniform(0.03, 0.06) * w))
        yy, xx = np.mgrid[0:bh, left:right]
        windows = ((yy % period) < 0.6 * period) & (((xx - left) % period) < 0.55 * period) & \
            (yy > period // 2)
        shade = smooth_noise(rng, bh, right - left, 6)[..., None] * 12
        colours = np.where(windows[..., None], window, base) + shade
        s.paint(np.ones((bh, right - left), bool), colours, "building",
                (top, s.horizon, left, right))


def _road_edges(s: Scene, vanish: float, half_bottom: float) -> tuple[np.ndarray, np.ndarray]:
    """Left and right road edge x for every row (NaN above the horizon)."""
    rows = np.arange(s.height, dtype=np.float32)
    depth = np.clip((rows - s.horizon) / (s.height - s.horizon), 0, 1)
    half = 0.02 * s.width + depth * half_bottom
    edges = np.stack([vanish - half, vanish + half])
    edges[:, rows < s.horizon] = np.nan
    return edges[0], edges[1]


def _ground(s: Scene, left_edge: np.ndarray, right_edge: np.ndarray) -> None:
    h, w, rng = s.height, s.width, s.rng
    gh = h - s.horizon
    yy, xx = np.mgrid[s.horizon:h, 0:w]
    le, re = left_edge[s.horizon:, None], right_edge[s.horizon:, None]
    road = (xx >= le) & (xx < re)
    box = (s.horizon, h, 0, w)
    tile = max(3, int(rng.uniform(0.02, 0.04) * w))
    tiles = ((yy % tile) == 0) | ((xx % tile) == 0)
    paving = hsv_colour(rng, sat=(0.0, 0.3), val=(0.45, 0.8))
    curb = (np.abs(xx - le) < 1.5 + 2 * (yy - s.horizon) / gh) | \
        (np.abs(xx - re) < 1.5 + 2 * (yy - s.horizon) / gh)
    colours = np.where(tiles[..., None], paving * 0.75, paving)
    colours = np.where(curb[..., None], np.minimum(paving + 50, 255), colours)
    s.paint(~road, colours, "sidewalk", box)
    asphalt = hsv_colour(rng, sat=(0.0, 0.12), val=(0.25, 0.5))
    patches = smooth_noise(rng, gh, w, 10)[..., None] * 10
    colours = asphalt + patches + grain(rng, (gh, w), 4)
    centre = (le + re) / 2
    dash = max(2, gh // 6)
    marks = (np.abs(xx - centre) < 0.5 + 1.5 * (yy - s.horizon) / gh) & \
        (((yy - s.horizon) // dash) % 2 == 0)
    colours = np.where(marks[..., None], np.float32(225), colours)
    s.paint(road, colours, "road", box)


# ---- objects ---------------------------------------------------------------------------------

def _clip_box(s: Scene, top, bottom, left, right):
    top, bottom = max(int(top), 0), min(int(bottom), s.height)
    left, right = max(int(left), 0), min(int(right), s.width)
    return (top, bottom, left, right) if bottom > top and right > left else None


def _ellipse(box, cy, cx, ry, rx) -> np.ndarray:
    top, bottom, left, right = box
    yy, xx = np.mgrid[top:bottom, left:right]
    return ((yy + 0.5 - cy) / ry) ** 2 + ((xx + 0.5 - cx) / rx) ** 2 <= 1


def _rect(box, top, bottom, left, right) -> np.ndarray:
    t, b, l, r = box
    yy, xx = np.mgrid[t:b, l:r]
    return (yy >= top) & (yy < bottom) & (xx >= left) & (xx < right)


def _tree(s: Scene, x: float, ground: float) -> None:
    rng, d = s.rng, s.depth(ground)
    size = (0.3 + d) * s.height * rng.uniform(0.4, 0.6)
    trunk_w = max(2.0, size * 0.12)
    crown_cy = ground - size * 0.95
    box = _clip_box(s, crown_cy - size * 0.6, ground, x - size * 0.7, x + size * 0.7)
    if box is None:
        return
    mask = _rect(box, crown_cy, ground, x - trunk_w / 2, x + trunk_w / 2)
    for _ in range(int(rng.integers(3, 7))):
        mask |= _ellipse(box, crown_cy + rng.uniform(-0.3, 0.2) * size,
                         x + rng.uniform(-0.35, 0.35) * size, size * rng.uniform(0.25, 0.45),
                         size * rng.uniform(0.25, 0.45))
    t, b, l, r = box
    autumn = rng.random() < 0.2
    leaf = hsv_colour(rng, (0.08, 0.14) if autumn else (0.2, 0.4), (0.4, 0.9), (0.2, 0.6))
    speckle = smooth_noise(rng, b - t, r - l, 1.5)[..., None] * 35
    s.paint(mask, leaf + speckle + grain(rng, (b - t, r - l), 6), "vegetation", box)


def _pole(s: Scene, x: float, ground: float) -> None:
    rng, d = s.rng, s.depth(ground)
    width = max(3.0, d * s.width * rng.uniform(0.06, 0.09))
    box = _clip_box(s, ground - d * s.height * rng.uniform(1.2, 1.8), ground, x - width / 2,
                    x + width / 2)
    if box is None:
        return
    t, b, l, r = box
    metal = hsv_colour(rng, sat=(0.0, 0.15), val=(0.3, 0.75))
    across = np.linspace(-1, 1, r - l, dtype=np.float32)[None, :, None]
    colours = metal + 40 * (0.5 - np.abs(across))
    s.paint(np.ones((b - t, r - l), bool), colours, "pole", box)


def _person(s: Scene, x: float, ground: float) -> None:
    rng, d = s.rng, s.depth(ground)
    height = d * s.height * rng.uniform(0.55, 0.75)
    width = height * 0.45
    box = _clip_box(s, ground - height, ground, x - width / 2, x + width / 2)
    if box is None or height < 6:
        return
    head_r = height * 0.09
    shirt = hsv_colour(rng, val=(0.15, 0.95))
    trousers = hsv_colour(rng, sat=(0.0, 0.6), val=(0.1, 0.6))
    skin = hsv_colour(rng, (0.03, 0.1), (0.25, 0.6), (0.35, 0.95))
    legs = _rect(box, ground - height * 0.48, ground, x - width * 0.32, x + width * 0.32)
    gap = _rect(box, ground - height * 0.4, ground, x - width * 0.04, x + width * 0.04)
    torso = _ellipse(box, ground - height * 0.65, x, height * 0.22, width * 0.5)
    head = _ellipse(box, ground - height + head_r * 1.1, x, head_r * 1.1, head_r)
    t, b, l, r = box
    colours = np.where(legs[..., None], trousers, shirt)
    colours = np.where(gap[..., None], trousers * 0.5, colours)   # drawn, not cut out
    colours = np.where(head[..., None], skin, colours)
    s.paint(legs | torso | head, colours, "person", box)


def _car(s: Scene, x: float, ground: float) -> None:
    rng, d = s.rng, s.depth(ground)
    width = d * s.width * rng.uniform(0.3, 0.42)
    height = width * rng.uniform(0.7, 0.9)
    box = _clip_box(s, ground - height, ground, x - width / 2, x + width / 2)
    if box is None or width < 6:
        return
    top = ground - height
    body = hsv_colour(rng, sat=(0.0, 0.9), val=(0.15, 0.95))
    glass = hsv_colour(rng, (0.5, 0.65), (0.1, 0.4), (0.1, 0.35))
    lower = _rect(box, top + height * 0.4, ground - height * 0.08, x - width / 2, x + width / 2)
    cabin = _ellipse(box, top + height * 0.45, x, height * 0.45, width * 0.4) & \
        _rect(box, top, top + height * 0.45, x - width, x + width)
    wheels = _rect(box, ground - height * 0.12, ground, x - width * 0.45, x - width * 0.25) | \
        _rect(box, ground - height * 0.12, ground, x + width * 0.25, x + width * 0.45)
    window = _ellipse(box, top + height * 0.47, x, height * 0.37, width * 0.33) & \
        _rect(box, top, top + height * 0.42, x - width, x + width)
    lights = _rect(box, top + height * 0.5, top + height * 0.6, x - width * 0.48,
                   x - width * 0.33) | \
        _rect(box, top + height * 0.5, top + height * 0.6, x + width * 0.33, x + width * 0.48)
    plate = _rect(box, top + height * 0.68, top + height * 0.8, x - width * 0.13,
                  x + width * 0.13)
    t, b, l, r = box
    shine = np.linspace(40, -20, b - t, dtype=np.float32)[:, None, None]
    colours = body + shine
    colours = np.where(window[..., None], glass, colours)
    colours = np.where(lights[..., None], np.asarray([200, 30, 30], np.float32), colours)
    colours = np.where(plate[..., None], np.float32(235), colours)
    colours = np.where(wheels[..., None], np.float32(25), colours)
    s.paint(lower | cabin | wheels, colours, "car", box)


def _static(s: Scene, x: float, ground: float) -> None:
    rng, d = s.rng, s.depth(ground)
    height, width = d * s.height * rng.uniform(0.08, 0.2), d * s.width * rng.uniform(0.04, 0.1)
    box = _clip_box(s, ground - height, ground, x - width / 2, x + width / 2)
    if box is None:
        return
    t, b, l, r = box
    colours = hsv_colour(rng, val=(0.2, 0.8)) + grain(rng, (b - t, r - l), 6)
    s.paint(np.ones((b - t, r - l), bool), colours, "static", box)


def _objects(s: Scene, left_edge: np.ndarray, right_edge: np.ndarray) -> None:
    """Place objects on the ground and paint them far to near."""
    rng, h, w = s.rng, s.height, s.width
    placed = []

    def ground_row(nearest: float = 0.12) -> int:   # depth in [nearest, 0.92), near ones likelier
        return int(s.horizon + (h - s.horizon) * (nearest + (0.92 - nearest) * rng.random() ** 0.7))

    def beside(y: int) -> float:   # a point on a sidewalk
        side = rng.random() < 0.5
        edge = left_edge[y] if side else right_edge[y]
        return edge - rng.uniform(0.03, 0.4) * w if side else edge + rng.uniform(0.03, 0.4) * w

    for _ in range(int(rng.integers(3, 7))):
        y = int(s.horizon + (h - s.horizon) * rng.uniform(0.02, 0.4))
        placed.append((y, _tree, beside(y)))
    for _ in range(int(rng.integers(1, 4))):
        y = ground_row(0.3)
        edge = left_edge[y] - 3 if rng.random() < 0.5 else right_edge[y] + 3
        placed.append((y, _pole, edge))
    for _ in range(int(rng.integers(2, 6))):
        y = ground_row(0.35)
        placed.append((y, _person, beside(y)))
    for _ in range(int(rng.integers(1, 4))):
        y = ground_row()
        placed.append((y, _car, rng.uniform(left_edge[y], right_edge[y])))
    if rng.random() < 0.5:
        y = ground_row()
        placed.append((y, _static, beside(y)))
    for y, draw, x in sorted(placed, key=lambda item: item[0]):
        draw(s, x, y)


# ---- what the camera calibration knows -------------------------------------------------------

def _calibration(s: Scene) -> None:
    h, w, rng = s.height, s.width, s.rng
    xx = np.linspace(-1, 1, w, dtype=np.float32)
    hood_top = h - h * (0.1 - 0.05 * xx ** 2)            # the same hood in every frame
    yy = np.arange(h, dtype=np.float32)[:, None]
    hood = yy >= hood_top[None, :]
    paint = hsv_colour(rng, (0.0, 1.0), (0.0, 0.2), (0.05, 0.2))
    glare = np.clip(1 - np.abs(yy - hood_top[None, :] - 2) / 3, 0, 1)[..., None] * 90
    s.paint(hood, paint + glare, "ego vehicle")
    frame = np.zeros((h, w), bool)
    frame[:2], frame[-2:], frame[:, :2], frame[:, -2:] = True, True, True, True
    s.label[frame] = s.instance[frame] = _id("out of roi")   # the image is unchanged there
    corner = max(4, w // 24)
    columns = np.arange(w)[None, :]
    border = (yy >= h - corner) & ((columns < corner - (h - 1 - yy)) |
                                   (columns >= w - corner + (h - 1 - yy)))
    s.paint(border, np.float32(0), "rectification border")


def render(rng: np.random.Generator, width: int, height: int, labelled: bool = True):
    """(image uint8 [H, W, 3], label ids uint8 [H, W], instance ids uint16 [H, W]) of one
    scene; ``labelled=False`` keeps only the calibration classes in the labels (test split)."""
    s = Scene(np.zeros((height, width, 3), np.float32), np.zeros((height, width), np.uint8),
              np.zeros((height, width), np.uint16), int(height * rng.uniform(0.38, 0.5)), rng, {})
    _sky(s)
    _buildings(s)
    left, right = _road_edges(s, width * rng.uniform(0.35, 0.65), width * rng.uniform(0.3, 0.5))
    _ground(s, left, right)
    _objects(s, left, right)
    lighting = rng.uniform(0.7, 1.2) * np.asarray(hsv_colour(rng, sat=(0, 0.15), val=(1, 1))) / 255
    s.image *= lighting
    if not labelled:
        s.label[:] = s.instance[:] = _id("unlabeled")
    _calibration(s)
    return np.clip(np.round(s.image), 0, 255).astype(np.uint8), s.label, s.instance
