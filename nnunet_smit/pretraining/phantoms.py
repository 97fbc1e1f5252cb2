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
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

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
        return self.z[box[0], None, None], self.y[None, box[1], None], self.x[None, None, box[2]]


def _ellipsoid(grid: _Grid, center: Sequence[float], semi: Sequence[float]) -> Tuple[Tuple[slice, ...], np.ndarray]:
    """(box, mask within box) of an axis-aligned ellipsoid; center and semi-axes (z, y, x) in mm."""
    box = grid.box(center, semi)
    z, y, x = grid.local(box)
    r = ((z - center[0]) / semi[0]) ** 2 + ((y - center[1]) / semi[1]) ** 2 + ((x - center[2]) / semi[2]) ** 2
    return box, r <= 1.0


def _paint(hu: np.ndarray, box: Tuple[slice, ...], mask: np.ndarray, value, allowed: np.ndarray = None,
           labels: Optional[np.ndarray] = None, label: int = 0) -> None:
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
    organ_z = np.flatnonzero(labels.any(axis=(1, 2)))
    margin = int(round(margin_mm / spacing[0]))
    z0, z1 = max(0, organ_z[0] - margin), min(hu.shape[0], organ_z[-1] + 1 + margin)
    # In-plane: the body's box; the table lies behind the back (larger y), separated by air rows.
    body = (hu[z0:z1] > -500).any(axis=0)
    rows, columns = body.any(axis=1), np.flatnonzero(body.any(axis=0))
    y0 = int(np.argmax(rows))
    y1 = y0 + int(np.argmin(rows[y0:])) if not rows[y0:].all() else len(rows)
    crop = (slice(z0, z1), slice(y0, y1), slice(int(columns[0]), int(columns[-1]) + 1))
    return np.ascontiguousarray(hu[crop]), np.ascontiguousarray(labels[crop]), spacing


def _phantom(
    rng: np.random.Generator,
    shape_range: Tuple[Tuple[int, int], Tuple[int, int]],
    fov_mm_range: Tuple[float, float],
    scan_length_mm_range: Tuple[float, float],
    slice_spacing_mm_range: Tuple[float, float],
    noise_hu_range: Tuple[float, float],
) -> Tuple[np.ndarray, np.ndarray, Tuple[float, float, float]]:
    """(HU int16, organ labels uint8, spacing): see :func:`generate_phantom_volume` for the arguments."""
    from scipy import ndimage

    (z_lo, z_hi), (n_lo, n_hi) = shape_range
    n_inplane = int(rng.integers(n_lo, n_hi + 1))
    fov = float(rng.uniform(*fov_mm_range))
    spacing_z = float(rng.uniform(*slice_spacing_mm_range))
    nz = int(np.clip(round(rng.uniform(*scan_length_mm_range) / spacing_z), z_lo, z_hi))
    spacing = (spacing_z, fov / n_inplane, fov / n_inplane)
    grid = _Grid((nz, n_inplane, n_inplane), spacing)
    length = nz * spacing_z
    z, y, x = grid.z[:, None, None], grid.y[None, :, None], grid.x[None, None, :]

    hu = np.full(grid.shape, -1000.0, dtype=np.float32)
    labels = np.zeros(grid.shape, dtype=np.uint8)
    liver, spleen, kidney = ORGAN_LABELS["liver"], ORGAN_LABELS["spleen"], ORGAN_LABELS["kidney"]

    # Body outline: an ellipse whose size drifts slowly along z; then fat, muscle wall and cavity.
    half_width = rng.uniform(0.40, 0.45) * fov
    half_depth = half_width * rng.uniform(0.70, 0.80)
    cy, cx = rng.uniform(-0.06, -0.02) * fov, rng.uniform(-0.03, 0.03) * fov
    drift = 1.0 + 0.04 * np.sin(2 * np.pi * (grid.z / length) * rng.uniform(0.5, 1.5) + rng.uniform(0, 2 * np.pi))
    drift = drift[:, None, None].astype(np.float32)
    fat_mm = rng.uniform(8.0, 25.0)
    wall_mm = rng.uniform(10.0, 16.0)

    def rho(shrink_mm: float) -> np.ndarray:
        a, b = half_width * drift - shrink_mm, half_depth * drift - shrink_mm
        return np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)

    rho_body, rho_muscle, rho_cavity = rho(0.0), rho(fat_mm), rho(fat_mm + wall_mm)
    hu[rho_body <= 1] = rng.uniform(-110, -90)
    hu[rho_muscle <= 1] = rng.uniform(40, 60)
    cavity = rho_cavity <= 1
    hu[cavity] = rng.uniform(15, 35)
    cavity_half_width = half_width - fat_mm - wall_mm
    cavity_half_depth = half_depth - fat_mm - wall_mm

    diaphragm_z = rng.uniform(0.40, 0.55) * length
    thorax = cavity & (z > diaphragm_z)
    abdomen = cavity & (z <= diaphragm_z)

    # Abdomen first (visceral fat, gas), organs painted over it.
    for _ in range(int(rng.integers(8, 16))):
        center = (rng.uniform(0, diaphragm_z), cy + rng.uniform(-0.7, 0.5) * cavity_half_depth,
                  cx + rng.uniform(-0.8, 0.8) * cavity_half_width)
        box, mask = _ellipsoid(grid, center, rng.uniform(10, 35, size=3))
        _paint(hu, box, mask, rng.uniform(-100, -70), abdomen)
    for _ in range(int(rng.integers(4, 14))):
        center = (rng.uniform(0, diaphragm_z - 30), cy + rng.uniform(-0.7, 0.3) * cavity_half_depth,
                  cx + rng.uniform(-0.7, 0.7) * cavity_half_width)
        box, mask = _ellipsoid(grid, center, rng.uniform(4, 18, size=3))
        _paint(hu, box, mask, rng.uniform(-1000, -900), abdomen)

    # Lungs with density increasing posteriorly, and vessels branching from the hila.
    lung_value = (-870.0 + 60.0 * (y - cy) / half_depth).astype(np.float32) + np.zeros_like(hu)
    for side in (-1, 1):
        center = (diaphragm_z + rng.uniform(0.55, 0.8) * length * 0.6,
                  cy + rng.uniform(0.0, 0.1) * cavity_half_depth,
                  cx + side * rng.uniform(0.42, 0.52) * cavity_half_width)
        semi = (rng.uniform(0.55, 0.7) * length * 0.6, rng.uniform(0.75, 0.9) * cavity_half_depth,
                rng.uniform(0.38, 0.46) * cavity_half_width)
        box, mask = _ellipsoid(grid, center, semi)
        _paint(hu, box, mask, lung_value[box], thorax)
        lung = np.zeros(grid.shape, dtype=bool)
        lung[box] = mask & thorax[box]
        hilum = np.array([center[0] - 0.1 * semi[0], center[1], center[2] - side * 0.6 * semi[2]])
        for _ in range(int(rng.integers(12, 20))):
            direction = rng.normal(size=3) * np.array([1.0, 0.6, 0.6]) + np.array([0.0, 0.0, side * 0.8])
            direction /= np.linalg.norm(direction)
            steps = np.arange(0.0, rng.uniform(50, 130), 2.0)
            bend = rng.normal(scale=0.004, size=3)
            points = hilum + steps[:, None] * direction + (steps[:, None] ** 2) * bend
            radii = np.linspace(rng.uniform(2.5, 4.0), 0.8, len(steps))
            _tube(hu, grid, points, radii, rng.uniform(30, 50), lung)

    # Heart with a pericardial fat rim, between the lungs, anterior.
    heart_center = (diaphragm_z + rng.uniform(35, 60), cy - rng.uniform(0.15, 0.3) * cavity_half_depth,
                    cx + rng.uniform(0.05, 0.15) * cavity_half_width)
    heart_semi = np.array([rng.uniform(45, 60), rng.uniform(40, 52), rng.uniform(50, 65)])
    box, mask = _ellipsoid(grid, heart_center, heart_semi + 5)
    _paint(hu, box, mask, rng.uniform(-100, -80), cavity)
    box, mask = _ellipsoid(grid, heart_center, heart_semi)
    _paint(hu, box, mask, rng.uniform(35, 50), cavity)

    # Vertebral column: bodies (cancellous core, cortical shell) separated by discs, canal and arch behind.
    spine_y = cy + half_depth * drift[:, :, :1] - fat_mm - wall_mm * 0.3 - rng.uniform(35, 45)
    spine_x = cx + rng.uniform(-3, 3)
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
    process = (np.abs(x - spine_x) <= 4) & (y > canal_y + 12) & (y < canal_y + 40) & (rho_muscle <= 1)
    hu[process & ~is_disc] = rng.uniform(450, 700)

    # Aorta: left-anterior of the spine, contrast-enhanced in half of the phantoms.
    aorta = np.sqrt((y - (spine_y - body_r - rng.uniform(12, 18))) ** 2 + (x - spine_x - rng.uniform(12, 22)) ** 2)
    hu[(aorta <= rng.uniform(10, 14)) & cavity] = rng.uniform(150, 300) if rng.random() < 0.5 else rng.uniform(35, 50)

    # Ribs in the chest wall, sloping down anteriorly, sparing the spine and the sternum.
    rib_period, rib_height = rng.uniform(24, 32), rng.uniform(7, 11)
    rib_z = (z + 0.35 * (y - cy) + rng.uniform(0, rib_period)) % rib_period
    in_wall = (rho_cavity > 1) & (rho_muscle <= 1) & (rho_cavity <= 1 + 9.0 / cavity_half_width)
    ribs = in_wall & (rib_z < rib_height) & (z > diaphragm_z - 40) & ~((np.abs(x - cx) < 25) & (y > cy))
    hu[ribs & ~((np.abs(x - cx) < 18) & (y < cy))] = rng.uniform(450, 800)
    sternum = in_wall & (np.abs(x - cx) < 16) & (y < cy) & (z > diaphragm_z - 20)
    hu[sternum] = rng.uniform(250, 450)

    # Upper abdominal organs under the diaphragm: liver (patient's right, -x) with a left lobe, spleen,
    # kidneys either side of the spine.
    liver_center = (diaphragm_z - rng.uniform(40, 70), cy + rng.uniform(-0.15, 0.1) * cavity_half_depth,
                    cx - rng.uniform(0.35, 0.5) * cavity_half_width)
    liver_value = rng.uniform(50, 70)
    box, mask = _ellipsoid(grid, liver_center, (rng.uniform(55, 85), rng.uniform(0.55, 0.75) * cavity_half_depth,
                                                rng.uniform(0.4, 0.55) * cavity_half_width))
    _paint(hu, box, mask, liver_value, abdomen, labels, liver)
    box, mask = _ellipsoid(grid, (liver_center[0] + rng.uniform(5, 25), cy - 0.35 * cavity_half_depth,
                                  cx + rng.uniform(-0.05, 0.15) * cavity_half_width),
                           (rng.uniform(30, 45), rng.uniform(25, 40), rng.uniform(40, 70)))
    _paint(hu, box, mask, liver_value, abdomen, labels, liver)
    box, mask = _ellipsoid(grid, (diaphragm_z - rng.uniform(30, 60), cy + rng.uniform(0.25, 0.45) * cavity_half_depth,
                                  cx + rng.uniform(0.5, 0.65) * cavity_half_width),
                           (rng.uniform(40, 55), rng.uniform(35, 55), rng.uniform(20, 32)))
    _paint(hu, box, mask, rng.uniform(40, 55), abdomen, labels, spleen)
    kidney_value = rng.uniform(30, 45) if rng.random() < 0.5 else rng.uniform(120, 180)
    for side in (-1, 1):
        kidney_center = (diaphragm_z - rng.uniform(80, 130) + (8 if side > 0 else 0),
                         float(np.mean(spine_y)) - rng.uniform(0, 15), spine_x + side * rng.uniform(50, 70))
        box, mask = _ellipsoid(grid, kidney_center, (rng.uniform(45, 60), rng.uniform(28, 35), rng.uniform(24, 32)))
        _paint(hu, box, mask, kidney_value, abdomen, labels, kidney)
        box, mask = _ellipsoid(grid, (kidney_center[0], kidney_center[1], kidney_center[2] - side * 10),
                               (20, 10, 8))
        _paint(hu, box, mask, rng.uniform(-90, -60), abdomen, labels, 0)  # renal sinus fat

    # Table: a curved carbon shell with a foam core, below the back, separated from the body by air.
    if rng.random() < 0.8:
        top = cy + half_depth * 1.06 + rng.uniform(5, 20) + 0.0008 * (x - cx) ** 2
        depth, thickness = y - top, rng.uniform(12, 20)
        table = (np.abs(x - cx) < 0.45 * fov) & (depth >= 0) & (depth < thickness)
        shell = table & ((depth < 2.5) | (depth > thickness - 2.5))
        hu[np.broadcast_to(table, hu.shape)] = -700.0
        hu[np.broadcast_to(shell, hu.shape)] = rng.uniform(150, 300)

    sigma_mm = 0.8
    hu = ndimage.gaussian_filter(hu, sigma=[sigma_mm / s for s in spacing], mode="nearest")
    hu += rng.normal(scale=rng.uniform(*noise_hu_range), size=hu.shape).astype(np.float32)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), labels, spacing


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
