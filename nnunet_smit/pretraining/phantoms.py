"""CT-like torso phantoms for tests and the pretraining demo.

Each phantom is an adult torso section in HU: air (-1000) around an elliptical body with a subcutaneous fat
layer (about -100) and a muscle wall (about 50), an abdominal cavity with bowel (about 25), visceral fat and
gas pockets, two lungs (about -850, denser posteriorly) with vessels, a heart with pericardial fat, the aorta
(optionally contrast-enhanced), a vertebral column (cortical shell 700-950, cancellous 180-320, discs,
spinal canal, posterior arch), ribs in the chest wall, liver, spleen and kidneys (40-70) of varied size and
position, and a patient table separated from the body by air. A slight blur gives partial-volume edges,
Gaussian noise (10-20 HU) the grain. Axes follow the identity-direction LPS layout SimpleITK writes:
array (z, y, x) with z superior, y posterior, x towards the patient's left.

Physical sizes are realistic (body 290-380 mm wide, scan 200-280 mm long) while voxels are coarse
(in-plane 2.1-3.3 mm, slices 1.5-5 mm, 128-160 voxels in-plane), so a corpus of 8 caches in seconds and
still yields at least 96^3 voxels per scan at the default 2 mm pretraining spacing.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

PathLike = Union[str, Path]

# Label values of the organs that labelled phantoms carry (nnU-Net dataset.json "labels").
ORGAN_LABELS: Dict[str, int] = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3}

# Phantoms of the demos: voxels of about 3 mm (in-plane 2.5-3.7 mm, slices 2.5-3.5 mm), so a 2-core CPU
# pretrains and fine-tunes on them in minutes; at the demo's 3 mm pretraining spacing every scan holds a 64^3 view.
DEMO_PHANTOM: Dict[str, Any] = {
    "shape_range": ((64, 110), (112, 136)),
    "fov_mm_range": (350.0, 420.0),
    "scan_length_mm_range": (220.0, 300.0),
    "slice_spacing_mm_range": (2.5, 3.5),
}


class _Grid:
    """Voxel-centre coordinates in mm: z (nz,1,1) from the inferior edge, y and x (1,ny,1)/(1,1,nx) centred."""

    def __init__(self, shape: Tuple[int, int, int], spacing: Tuple[float, float, float]) -> None:
        nz, ny, nx = shape
        self.shape = shape
        self.spacing = spacing
        self.z = ((np.arange(nz) + 0.5) * spacing[0]).astype(np.float32)
        self.y = ((np.arange(ny) - ny / 2 + 0.5) * spacing[1]).astype(np.float32)
        self.x = ((np.arange(nx) - nx / 2 + 0.5) * spacing[2]).astype(np.float32)

    def box(self, center: Sequence[float], half: Sequence[float]) -> Tuple[slice, ...]:
        """Index box covering center +- half (mm) on each axis, clipped to the volume."""
        out = []
        for coords, c, h in zip((self.z, self.y, self.x), center, half):
            lo = int(np.searchsorted(coords, c - h))
            hi = int(np.searchsorted(coords, c + h, side="right"))
            out.append(slice(lo, max(lo, hi)))
        return tuple(out)

    def local(self, box: Tuple[slice, ...]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Coordinates (mm) within ``box``: z (nz,1,1), y (1,ny,1), x (1,1,nx)."""
        return self.z[box[0], None, None], self.y[None, box[1], None], self.x[None, None, box[2]]


def _ellipsoid(grid: _Grid, center: Sequence[float], semi: Sequence[float]) -> Tuple[Tuple[slice, ...], np.ndarray]:
    """(box, mask within box) of an axis-aligned ellipsoid; center and semi-axes (z, y, x) in mm."""
    box = grid.box(center, semi)
    z, y, x = grid.local(box)
    r = ((z - center[0]) / semi[0]) ** 2 + ((y - center[1]) / semi[1]) ** 2 + ((x - center[2]) / semi[2]) ** 2
    return box, r <= 1.0


def _paint(hu: np.ndarray, box: Tuple[slice, ...], mask: np.ndarray, value: Union[float, np.ndarray],
           allowed: Optional[np.ndarray] = None, labels: Optional[np.ndarray] = None, label: int = 0) -> None:
    """Set ``hu`` to ``value`` inside ``mask`` (within ``box``, where ``allowed``); ``labels`` gets ``label`` there."""
    if allowed is not None:
        mask = mask & allowed[box]
    region = hu[box]
    region[mask] = value if np.isscalar(value) else value[mask]
    if labels is not None:
        labels[box][mask] = label


def _tube(hu: np.ndarray, grid: _Grid, points: np.ndarray, radii: np.ndarray, value: float,
          allowed: np.ndarray) -> None:
    """Stamp spheres of ``radii`` (mm) at ``points`` (n, 3) (z, y, x mm), only where ``allowed``."""
    for p, r in zip(points, radii):
        box, mask = _ellipsoid(grid, p, (r, r, r))
        _paint(hu, box, mask, value, allowed)


def generate_phantom_volume(
    rng: np.random.Generator,
    shape_range: Tuple[Tuple[int, int], Tuple[int, int]] = ((40, 160), (128, 160)),
    fov_mm_range: Tuple[float, float] = (340.0, 420.0),
    scan_length_mm_range: Tuple[float, float] = (200.0, 280.0),
    slice_spacing_mm_range: Tuple[float, float] = (1.5, 5.0),
    noise_hu_range: Tuple[float, float] = (10.0, 20.0),
) -> Tuple[np.ndarray, Tuple[float, float, float]]:
    """One random torso phantom.

    Args:
        rng: the only source of randomness (same state, same phantom).
        shape_range: ((min, max) slices, (min, max) in-plane voxels); the slice count is the scan length over
            the slice spacing, clipped to its range.
        fov_mm_range: in-plane field of view (mm); in-plane spacing = FOV / in-plane voxels.
        scan_length_mm_range: craniocaudal extent (mm).
        slice_spacing_mm_range: slice spacing (mm).
        noise_hu_range: standard deviation of the Gaussian noise (HU).

    Returns:
        (array int16 (z, y, x) in HU, spacing (z, y, x) in mm).
    """
    hu, _, spacing = _phantom(rng, shape_range, fov_mm_range, scan_length_mm_range, slice_spacing_mm_range,
                              noise_hu_range)
    return hu, spacing


def generate_labelled_phantom(
    rng: np.random.Generator, margin_mm: float = 20.0, **ranges: Any,
) -> Tuple[np.ndarray, np.ndarray, Tuple[float, float, float]]:
    """A phantom with its organ label map (``ORGAN_LABELS``), cropped to the upper abdomen, as abdominal CT is.

    The crop keeps the body's in-plane box (table and air around it dropped) and the slices from ``margin_mm``
    below the lowest organ to ``margin_mm`` above the highest. Liver (50-70 HU), spleen (40-55 HU) and kidneys
    (30-45 HU, or 120-180 HU enhanced in half the phantoms) lie among muscle (40-60 HU), bowel (15-35 HU) and fat
    under 10-20 HU of noise: telling them apart takes shape and position, not a threshold.

    Args:
        rng: the only source of randomness; the image equals ``generate_phantom_volume``'s for the same state
            and ranges, before the crop.
        margin_mm: extra extent kept around the organs along z (mm).
        **ranges: passed to :func:`generate_phantom_volume` (e.g. ``**DEMO_PHANTOM``).

    Returns:
        (HU int16 (z, y, x), labels uint8 (z, y, x), spacing (z, y, x) in mm).
    """
    defaults = {name: parameter.default for name, parameter in
                inspect.signature(generate_phantom_volume).parameters.items() if parameter.default is not parameter.empty}
    hu, labels, spacing = _phantom(rng, **{**defaults, **ranges})
    crop = _upper_abdomen_crop(hu, labels, spacing, margin_mm)
    return np.ascontiguousarray(hu[crop]), np.ascontiguousarray(labels[crop]), spacing


def _upper_abdomen_crop(hu: np.ndarray, labels: np.ndarray, spacing: Tuple[float, float, float],
                        margin_mm: float) -> Tuple[slice, slice, slice]:
    """(z, y, x) slices of HU and labels (z, y, x): organ slices +- ``margin_mm`` (mm), the body's in-plane box."""
    organ_z = np.flatnonzero(labels.any(axis=(1, 2)))
    margin = int(round(margin_mm / spacing[0]))
    z0, z1 = max(0, organ_z[0] - margin), min(hu.shape[0], organ_z[-1] + 1 + margin)
    # In-plane: the body's box; the table lies behind the back (larger y), separated by air rows.
    body = (hu[z0:z1] > -500).any(axis=0)
    rows, columns = body.any(axis=1), np.flatnonzero(body.any(axis=0))
    y0 = int(np.argmax(rows))
    y1 = y0 + int(np.argmin(rows[y0:])) if not rows[y0:].all() else len(rows)
    return slice(z0, z1), slice(y0, y1), slice(int(columns[0]), int(columns[-1]) + 1)


def _phantom(
    rng: np.random.Generator,
    shape_range: Tuple[Tuple[int, int], Tuple[int, int]],
    fov_mm_range: Tuple[float, float],
    scan_length_mm_range: Tuple[float, float],
    slice_spacing_mm_range: Tuple[float, float],
    noise_hu_range: Tuple[float, float],
) -> Tuple[np.ndarray, np.ndarray, Tuple[float, float, float]]:
    """(HU int16 (z, y, x), organ labels uint8 (z, y, x), spacing (z, y, x) in mm): see generate_phantom_volume.

    Each step draws from ``rng`` in turn, so reordering the steps changes every phantom.
    """
    grid, fov = _scan_grid(rng, shape_range, fov_mm_range, scan_length_mm_range, slice_spacing_mm_range)
    hu = np.full(grid.shape, -1000.0, dtype=np.float32)
    labels = np.zeros(grid.shape, dtype=np.uint8)
    body = _body_outline(hu, grid, rng, fov)
    # Abdomen first (visceral fat, gas), organs painted over it.
    _visceral_fat(hu, grid, body, rng)
    _bowel_gas(hu, grid, body, rng)
    _lungs(hu, grid, body, rng)
    _heart(hu, grid, body, rng)
    spine = _spine(hu, grid, body, rng)
    _aorta(hu, grid, body, spine, rng)
    _ribs_and_sternum(hu, grid, body, rng)
    _liver(hu, labels, grid, body, rng)
    _spleen(hu, labels, grid, body, rng)
    _kidneys(hu, labels, grid, body, spine, rng)
    _table(hu, grid, body, rng)
    return _blur_and_noise(hu, grid.spacing, rng, noise_hu_range), labels, grid.spacing


@dataclass(frozen=True, eq=False)
class _Body:
    """Torso geometry the structures share: lengths in mm, masks and normalised radii (z, y, x)."""

    fov: float  # in-plane field of view
    length: float  # scan length along z
    cy: float  # centre of the body ellipse
    cx: float
    half_width: float  # semi-axes of the body ellipse (x, y), scaled by ``drift`` per slice
    half_depth: float
    drift: np.ndarray  # (z, 1, 1) float32 factor, about 1 +- 0.04, of the outline's size along z
    fat_mm: float  # subcutaneous fat thickness
    wall_mm: float  # muscle wall thickness
    rho_muscle: np.ndarray  # elliptic radius, 1 on the muscle wall's outer edge
    rho_cavity: np.ndarray  # elliptic radius, 1 on the cavity's edge
    cavity: np.ndarray  # bool, inside the muscle wall
    cavity_half_width: float  # semi-axes of the cavity (before drift)
    cavity_half_depth: float
    diaphragm_z: float  # height of the diaphragm above the inferior edge
    thorax: np.ndarray  # bool, cavity above the diaphragm
    abdomen: np.ndarray  # bool, cavity at and below the diaphragm


class _Spine(NamedTuple):
    """The vertebral column's axis: ``y`` (z, 1, 1) and ``x`` in mm, and the vertebral body radius (mm)."""

    y: np.ndarray
    x: float
    body_r: float


def _scan_grid(
    rng: np.random.Generator,
    shape_range: Tuple[Tuple[int, int], Tuple[int, int]],
    fov_mm_range: Tuple[float, float],
    scan_length_mm_range: Tuple[float, float],
    slice_spacing_mm_range: Tuple[float, float],
) -> Tuple[_Grid, float]:
    """Draw the voxel grid (shape (z, y, x), spacing in mm) and the in-plane field of view (mm)."""
    (z_lo, z_hi), (n_lo, n_hi) = shape_range
    n_inplane = int(rng.integers(n_lo, n_hi + 1))
    fov = float(rng.uniform(*fov_mm_range))
    spacing_z = float(rng.uniform(*slice_spacing_mm_range))
    nz = int(np.clip(round(rng.uniform(*scan_length_mm_range) / spacing_z), z_lo, z_hi))
    return _Grid((nz, n_inplane, n_inplane), (spacing_z, fov / n_inplane, fov / n_inplane)), fov


def _body_outline(hu: np.ndarray, grid: _Grid, rng: np.random.Generator, fov: float) -> _Body:
    """Paint the body ellipse (fat -110 to -90 HU, muscle 40-60 HU, cavity 15-35 HU); place the diaphragm."""
    length = grid.shape[0] * grid.spacing[0]
    half_width = rng.uniform(0.40, 0.45) * fov
    half_depth = half_width * rng.uniform(0.70, 0.80)
    cy, cx = rng.uniform(-0.06, -0.02) * fov, rng.uniform(-0.03, 0.03) * fov
    # The outline's size drifts slowly along z, as a torso's does.
    drift = 1.0 + 0.04 * np.sin(2 * np.pi * (grid.z / length) * rng.uniform(0.5, 1.5) + rng.uniform(0, 2 * np.pi))
    drift = drift[:, None, None].astype(np.float32)
    fat_mm = rng.uniform(8.0, 25.0)
    wall_mm = rng.uniform(10.0, 16.0)

    def rho(shrink_mm: float) -> np.ndarray:
        """Elliptic radius (z, y, x), 1 on the outline shrunk by ``shrink_mm`` (mm)."""
        a, b = half_width * drift - shrink_mm, half_depth * drift - shrink_mm
        return np.sqrt(((grid.x[None, None, :] - cx) / a) ** 2 + ((grid.y[None, :, None] - cy) / b) ** 2)

    rho_body, rho_muscle, rho_cavity = rho(0.0), rho(fat_mm), rho(fat_mm + wall_mm)
    hu[rho_body <= 1] = rng.uniform(-110, -90)
    hu[rho_muscle <= 1] = rng.uniform(40, 60)
    cavity = rho_cavity <= 1
    hu[cavity] = rng.uniform(15, 35)
    diaphragm_z = rng.uniform(0.40, 0.55) * length
    z = grid.z[:, None, None]
    return _Body(fov=fov, length=length, cy=cy, cx=cx, half_width=half_width, half_depth=half_depth, drift=drift,
                 fat_mm=fat_mm, wall_mm=wall_mm, rho_muscle=rho_muscle, rho_cavity=rho_cavity, cavity=cavity,
                 cavity_half_width=half_width - fat_mm - wall_mm, cavity_half_depth=half_depth - fat_mm - wall_mm,
                 diaphragm_z=diaphragm_z, thorax=cavity & (z > diaphragm_z), abdomen=cavity & (z <= diaphragm_z))


def _visceral_fat(hu: np.ndarray, grid: _Grid, body: _Body, rng: np.random.Generator) -> None:
    """Paint 8-15 ellipsoids of visceral fat (-100 to -70 HU, semi-axes 10-35 mm) in the abdomen."""
    for _ in range(int(rng.integers(8, 16))):
        center = (rng.uniform(0, body.diaphragm_z), body.cy + rng.uniform(-0.7, 0.5) * body.cavity_half_depth,
                  body.cx + rng.uniform(-0.8, 0.8) * body.cavity_half_width)
        box, mask = _ellipsoid(grid, center, rng.uniform(10, 35, size=3))
        _paint(hu, box, mask, rng.uniform(-100, -70), body.abdomen)


def _bowel_gas(hu: np.ndarray, grid: _Grid, body: _Body, rng: np.random.Generator) -> None:
    """Paint 4-13 gas pockets (-1000 to -900 HU, semi-axes 4-18 mm) in the abdomen, from 30 mm below the diaphragm."""
    for _ in range(int(rng.integers(4, 14))):
        center = (rng.uniform(0, body.diaphragm_z - 30), body.cy + rng.uniform(-0.7, 0.3) * body.cavity_half_depth,
                  body.cx + rng.uniform(-0.7, 0.7) * body.cavity_half_width)
        box, mask = _ellipsoid(grid, center, rng.uniform(4, 18, size=3))
        _paint(hu, box, mask, rng.uniform(-1000, -900), body.abdomen)


def _lungs(hu: np.ndarray, grid: _Grid, body: _Body, rng: np.random.Generator) -> None:
    """Paint two lungs in the thorax (about -870 HU, up to 60 HU denser posteriorly), each with its vessels."""
    lung_value = (-870.0 + 60.0 * (grid.y[None, :, None] - body.cy) / body.half_depth).astype(np.float32)
    lung_value = lung_value + np.zeros_like(hu)
    for side in (-1, 1):
        center = (body.diaphragm_z + rng.uniform(0.55, 0.8) * body.length * 0.6,
                  body.cy + rng.uniform(0.0, 0.1) * body.cavity_half_depth,
                  body.cx + side * rng.uniform(0.42, 0.52) * body.cavity_half_width)
        semi = (rng.uniform(0.55, 0.7) * body.length * 0.6, rng.uniform(0.75, 0.9) * body.cavity_half_depth,
                rng.uniform(0.38, 0.46) * body.cavity_half_width)
        box, mask = _ellipsoid(grid, center, semi)
        _paint(hu, box, mask, lung_value[box], body.thorax)
        lung = np.zeros(grid.shape, dtype=bool)
        lung[box] = mask & body.thorax[box]
        hilum = np.array([center[0] - 0.1 * semi[0], center[1], center[2] - side * 0.6 * semi[2]])
        _lung_vessels(hu, grid, rng, hilum, side, lung)


def _lung_vessels(hu: np.ndarray, grid: _Grid, rng: np.random.Generator, hilum: np.ndarray, side: int,
                  lung: np.ndarray) -> None:
    """Paint 12-19 vessels (30-50 HU), tapering bent tubes from ``hilum`` (z, y, x mm) towards ``side``, in ``lung``."""
    for _ in range(int(rng.integers(12, 20))):
        direction = rng.normal(size=3) * np.array([1.0, 0.6, 0.6]) + np.array([0.0, 0.0, side * 0.8])
        direction /= np.linalg.norm(direction)
        steps = np.arange(0.0, rng.uniform(50, 130), 2.0)
        bend = rng.normal(scale=0.004, size=3)
        points = hilum + steps[:, None] * direction + (steps[:, None] ** 2) * bend
        radii = np.linspace(rng.uniform(2.5, 4.0), 0.8, len(steps))
        _tube(hu, grid, points, radii, rng.uniform(30, 50), lung)


def _heart(hu: np.ndarray, grid: _Grid, body: _Body, rng: np.random.Generator) -> None:
    """Paint the heart (35-50 HU) in a 5 mm pericardial fat rim (-100 to -80 HU), anterior between the lungs."""
    heart_center = (body.diaphragm_z + rng.uniform(35, 60), body.cy - rng.uniform(0.15, 0.3) * body.cavity_half_depth,
                    body.cx + rng.uniform(0.05, 0.15) * body.cavity_half_width)
    heart_semi = np.array([rng.uniform(45, 60), rng.uniform(40, 52), rng.uniform(50, 65)])
    box, mask = _ellipsoid(grid, heart_center, heart_semi + 5)
    _paint(hu, box, mask, rng.uniform(-100, -80), body.cavity)
    box, mask = _ellipsoid(grid, heart_center, heart_semi)
    _paint(hu, box, mask, rng.uniform(35, 50), body.cavity)


def _spine(hu: np.ndarray, grid: _Grid, body: _Body, rng: np.random.Generator) -> _Spine:
    """Paint the vertebral column: bodies (cancellous core, cortical shell) between discs, canal and arch behind."""
    z, y, x = grid.z[:, None, None], grid.y[None, :, None], grid.x[None, None, :]
    spine_y = body.cy + body.half_depth * body.drift[:, :, :1] - body.fat_mm - body.wall_mm * 0.3 - rng.uniform(35, 45)
    spine_x = body.cx + rng.uniform(-3, 3)
    body_r = rng.uniform(16, 22)
    radial = np.sqrt((y - spine_y) ** 2 + (x - spine_x) ** 2)
    period, disc = rng.uniform(26, 34), rng.uniform(6, 9)
    is_disc = ((z + rng.uniform(0, period)) % period) < disc
    hu[radial <= body_r] = rng.uniform(180, 320)
    hu[(radial <= body_r) & (radial > body_r - 2.5)] = rng.uniform(700, 950)
    hu[(radial <= body_r) & is_disc] = rng.uniform(70, 100)
    canal_y = spine_y + body_r + 9
    canal = np.sqrt((y - canal_y) ** 2 + (x - spine_x) ** 2)
    hu[(canal <= 14) & (canal > 8)] = rng.uniform(450, 700)
    hu[canal <= 8] = rng.uniform(5, 20)
    process = (np.abs(x - spine_x) <= 4) & (y > canal_y + 12) & (y < canal_y + 40) & (body.rho_muscle <= 1)
    hu[process & ~is_disc] = rng.uniform(450, 700)
    return _Spine(spine_y, spine_x, body_r)


def _aorta(hu: np.ndarray, grid: _Grid, body: _Body, spine: _Spine, rng: np.random.Generator) -> None:
    """Paint the aorta left-anterior of the spine: 150-300 HU (contrast) in half of the phantoms, else 35-50 HU."""
    y, x = grid.y[None, :, None], grid.x[None, None, :]
    distance = np.sqrt((y - (spine.y - spine.body_r - rng.uniform(12, 18))) ** 2
                       + (x - spine.x - rng.uniform(12, 22)) ** 2)
    value = rng.uniform(150, 300) if rng.random() < 0.5 else rng.uniform(35, 50)
    radius = rng.uniform(10, 14)
    hu[(distance <= radius) & body.cavity] = value


def _ribs_and_sternum(hu: np.ndarray, grid: _Grid, body: _Body, rng: np.random.Generator) -> None:
    """Paint ribs (450-800 HU) in the chest wall, sloping down anteriorly, sparing spine and sternum (250-450 HU)."""
    z, y, x = grid.z[:, None, None], grid.y[None, :, None], grid.x[None, None, :]
    cy, cx = body.cy, body.cx
    rib_period, rib_height = rng.uniform(24, 32), rng.uniform(7, 11)
    rib_z = (z + 0.35 * (y - cy) + rng.uniform(0, rib_period)) % rib_period
    in_wall = (body.rho_cavity > 1) & (body.rho_muscle <= 1) & (body.rho_cavity <= 1 + 9.0 / body.cavity_half_width)
    ribs = in_wall & (rib_z < rib_height) & (z > body.diaphragm_z - 40) & ~((np.abs(x - cx) < 25) & (y > cy))
    hu[ribs & ~((np.abs(x - cx) < 18) & (y < cy))] = rng.uniform(450, 800)
    sternum = in_wall & (np.abs(x - cx) < 16) & (y < cy) & (z > body.diaphragm_z - 20)
    hu[sternum] = rng.uniform(250, 450)


def _liver(hu: np.ndarray, labels: np.ndarray, grid: _Grid, body: _Body, rng: np.random.Generator) -> None:
    """Paint and label the liver (50-70 HU) under the diaphragm: right lobe on the patient's right (-x), left lobe."""
    cy, cx, liver = body.cy, body.cx, ORGAN_LABELS["liver"]
    liver_center = (body.diaphragm_z - rng.uniform(40, 70), cy + rng.uniform(-0.15, 0.1) * body.cavity_half_depth,
                    cx - rng.uniform(0.35, 0.5) * body.cavity_half_width)
    liver_value = rng.uniform(50, 70)
    box, mask = _ellipsoid(grid, liver_center, (rng.uniform(55, 85), rng.uniform(0.55, 0.75) * body.cavity_half_depth,
                                                rng.uniform(0.4, 0.55) * body.cavity_half_width))
    _paint(hu, box, mask, liver_value, body.abdomen, labels, liver)
    box, mask = _ellipsoid(grid, (liver_center[0] + rng.uniform(5, 25), cy - 0.35 * body.cavity_half_depth,
                                  cx + rng.uniform(-0.05, 0.15) * body.cavity_half_width),
                           (rng.uniform(30, 45), rng.uniform(25, 40), rng.uniform(40, 70)))
    _paint(hu, box, mask, liver_value, body.abdomen, labels, liver)


def _spleen(hu: np.ndarray, labels: np.ndarray, grid: _Grid, body: _Body, rng: np.random.Generator) -> None:
    """Paint and label the spleen (40-55 HU) under the diaphragm, posterior on the patient's left (+x)."""
    box, mask = _ellipsoid(grid, (body.diaphragm_z - rng.uniform(30, 60),
                                  body.cy + rng.uniform(0.25, 0.45) * body.cavity_half_depth,
                                  body.cx + rng.uniform(0.5, 0.65) * body.cavity_half_width),
                           (rng.uniform(40, 55), rng.uniform(35, 55), rng.uniform(20, 32)))
    _paint(hu, box, mask, rng.uniform(40, 55), body.abdomen, labels, ORGAN_LABELS["spleen"])


def _kidneys(hu: np.ndarray, labels: np.ndarray, grid: _Grid, body: _Body, spine: _Spine,
             rng: np.random.Generator) -> None:
    """Paint and label kidneys either side of the spine: 30-45 HU, or 120-180 HU (enhanced) in half the phantoms."""
    kidney_value = rng.uniform(30, 45) if rng.random() < 0.5 else rng.uniform(120, 180)
    for side in (-1, 1):
        kidney_center = (body.diaphragm_z - rng.uniform(80, 130) + (8 if side > 0 else 0),
                         float(np.mean(spine.y)) - rng.uniform(0, 15), spine.x + side * rng.uniform(50, 70))
        box, mask = _ellipsoid(grid, kidney_center, (rng.uniform(45, 60), rng.uniform(28, 35), rng.uniform(24, 32)))
        _paint(hu, box, mask, kidney_value, body.abdomen, labels, ORGAN_LABELS["kidney"])
        box, mask = _ellipsoid(grid, (kidney_center[0], kidney_center[1], kidney_center[2] - side * 10),
                               (20, 10, 8))
        _paint(hu, box, mask, rng.uniform(-90, -60), body.abdomen, labels, 0)  # renal sinus fat


def _table(hu: np.ndarray, grid: _Grid, body: _Body, rng: np.random.Generator) -> None:
    """Paint, in 4 phantoms of 5, the table below the back: curved carbon shell (150-300 HU), foam core (-700 HU)."""
    if rng.random() >= 0.8:
        return
    y, x, cx = grid.y[None, :, None], grid.x[None, None, :], body.cx
    # 5-20 mm of air between the back and the table, so that a body crop leaves the table out.
    top = body.cy + body.half_depth * 1.06 + rng.uniform(5, 20) + 0.0008 * (x - cx) ** 2
    depth, thickness = y - top, rng.uniform(12, 20)
    table = (np.abs(x - cx) < 0.45 * body.fov) & (depth >= 0) & (depth < thickness)
    shell = table & ((depth < 2.5) | (depth > thickness - 2.5))
    hu[np.broadcast_to(table, hu.shape)] = -700.0
    hu[np.broadcast_to(shell, hu.shape)] = rng.uniform(150, 300)


def _blur_and_noise(hu: np.ndarray, spacing: Tuple[float, float, float], rng: np.random.Generator,
                    noise_hu_range: Tuple[float, float]) -> np.ndarray:
    """Blur (z, y, x) HU by 0.8 mm for partial-volume edges, add Gaussian noise, round to int16 in -1024..3071 HU."""
    from scipy import ndimage

    sigma_mm = 0.8
    hu = ndimage.gaussian_filter(hu, sigma=[sigma_mm / s for s in spacing], mode="nearest")
    hu += rng.normal(scale=rng.uniform(*noise_hu_range), size=hu.shape).astype(np.float32)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def write_phantom_image(array: np.ndarray, spacing: Sequence[float], path: PathLike) -> Path:
    """Write a (z, y, x) array with its spacing (mm) as SimpleITK does (identity direction, body-centred origin)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    nz, ny, nx = array.shape
    image.SetOrigin((-nx * spacing[2] / 2, -ny * spacing[1] / 2, 0.0))
    sitk.WriteImage(image, str(path), True)
    return Path(path)


def generate_phantom_corpus(
    out_dir: PathLike,
    n_cases: int = 8,
    seed: int = 0,
    shape_range: Tuple[Tuple[int, int], Tuple[int, int]] = ((40, 160), (128, 160)),
    **ranges: Any,
) -> List[Path]:
    """Write ``n_cases`` phantoms as ``phantom_###.nii.gz`` (int16 HU) into ``out_dir``.

    Case ``i`` depends only on (seed, i): the same seed gives identical files, and a larger ``n_cases``
    extends a corpus without changing its first cases. See :func:`generate_phantom_volume` for the ranges
    (``shape_range`` and the others in ``ranges``, e.g. ``**DEMO_PHANTOM``).

    Returns:
        The written paths, in case order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_cases):
        hu, spacing = generate_phantom_volume(np.random.default_rng([seed, i]), **{"shape_range": shape_range,
                                                                                  **ranges})
        paths.append(write_phantom_image(hu, spacing, out / f"phantom_{i:03d}.nii.gz"))
    return paths
