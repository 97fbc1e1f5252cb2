"""PNG figures of a pretraining run: loss curves from the JSON-lines log and a reconstruction preview."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from nnunet_smit.files import atomic_write

logger = logging.getLogger(__name__)

# The solid curve of each objective and, dashed beside it, what it is measured against: the reconstruction loss's
# trivial baselines, and for DINO and iBOT their teacher's entropy (the least the cross-entropy can be) and log K.
OBJECTIVE_PANELS = {
    "reconstruction": ("reconstruction", ("recon_l1_view_mean", "recon_l1_block_mean")),
    "dino": ("dino", ("teacher_entropy",)),
    "ibot": ("ibot", ("teacher_patch_entropy",)),
}
PANELS = ("loss", *OBJECTIVE_PANELS, "lr", "teacher_entropy", "teacher_spread", "probe")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def read_log(log_path: Path) -> List[Dict]:
    """Records of a JSON-lines log (unreadable lines are skipped)."""
    records = []
    if not Path(log_path).exists():
        return records
    for line in Path(log_path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _series(records: List[Dict], key: str) -> Optional[List[float]]:
    """The values of ``key`` in ``records`` (NaN where absent), or None when no record has it."""
    values = [r.get(key) for r in records]
    if all(v is None for v in values):
        return None
    return [np.nan if v is None else v for v in values]


def prototypes_of(records: List[Dict]) -> Dict[str, int]:
    """{head: K} from the last start or resume record that says (empty for logs written before it was recorded)."""
    for record in reversed(records):
        if record.get("event") in ("start", "resume") and "prototypes" in record:
            return dict(record["prototypes"])
    return {}


def loss_figure(records: List[Dict]) -> Tuple[Any, Dict[str, Any]]:
    """The loss-curve figure of a run's log records: (figure, {panel name: Axes}) with the panels of ``PANELS``.

    Each objective has its own panel, its loss solid and its references dashed (``OBJECTIVE_PANELS``; log K where
    the log's start or resume record gives K). Then the learning rate, the teacher's entropies and the teacher's
    per-prototype spread with the KoLeo term, and the online probe's Dice where the run has one.
    """
    plt = _pyplot()
    train = [r for r in records if r.get("event") == "train"]
    prototypes = prototypes_of(records)
    fig, grid = plt.subplots(2, 4, figsize=(20, 8))
    panels = dict(zip(PANELS, grid.flat))
    steps = [r["step"] for r in train]
    for ax in panels.values():
        ax.set_xlabel("step")

    total = _series(train, "loss")
    if total is not None:
        panels["loss"].plot(steps, total, label="loss")
    panels["loss"].set_ylabel("loss (weighted total)")
    panels["loss"].set_yscale("log")
    for name, (key, references) in OBJECTIVE_PANELS.items():
        ax = panels[name]
        ax.set_ylabel(f"{name} loss (unweighted)")
        values = _series(train, key)
        if values is None:
            ax.set_title(f"{name}: off")
            continue
        ax.plot(steps, values, label=key)
        for reference in references:
            reference_values = _series(train, reference)
            if reference_values is not None:
                ax.plot(steps, reference_values, linestyle="--", label=reference)
        if name in prototypes:
            k = int(prototypes[name])
            ax.axhline(math.log(k), linestyle="--", color="tab:gray", label=f"log K (K = {k}): uniform teacher")
        if name == "reconstruction":
            ax.set_yscale("log")
        ax.legend()

    panels["lr"].plot(steps, [r.get("lr") for r in train], label="lr")
    panels["lr"].set_ylabel("learning rate")
    panels["lr"].ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    for key in ("teacher_entropy", "teacher_marginal_entropy", "teacher_patch_entropy"):
        values = _series(train, key)
        if values is not None:
            panels["teacher_entropy"].plot(steps, values, label=key)
    panels["teacher_entropy"].set_ylabel("teacher entropy (nats)")
    if panels["teacher_entropy"].lines:
        panels["teacher_entropy"].legend()
    _draw_spread(panels["teacher_spread"], steps, train)
    _draw_probe(panels["probe"], [r for r in records if r.get("event") == "probe"])
    fig.tight_layout()
    return fig, panels


def _draw_probe(ax: Any, probes: List[Dict]) -> None:
    """The online probe's held-out Dice over steps (foreground mean solid, each class dashed)."""
    ax.set_ylabel("online probe Dice (held out)")
    scored = [r for r in probes if r.get("probe_dice") is not None]
    if not scored:
        ax.set_title("online probe: off" if not probes else "online probe: no score yet")
        return
    steps = [r["step"] for r in scored]
    ax.plot(steps, [r["probe_dice"] for r in scored], marker="o", label="mean of classes")
    names = dict.fromkeys(name for r in scored for name in (r.get("probe_dice_per_class") or {}))
    for name in names:
        values = [(r.get("probe_dice_per_class") or {}).get(name) for r in scored]
        ax.plot(steps, [np.nan if v is None else v for v in values], linestyle="--", marker=".", label=name)
    ax.set_ylim(0, 1)
    ax.legend()


def _draw_spread(ax: Any, steps: List[int], train: List[Dict]) -> None:
    """Collapse watch: the teacher's per-prototype spread across views (0: every view alike), and the KoLeo term
    that keeps the embeddings apart (it may be negative, hence its own linear axis)."""
    spread = _series(train, "teacher_dim_std")
    if spread is not None:
        ax.plot(steps, spread, color="tab:purple", label="teacher spread")
        ax.set_yscale("log")
        ax.set_ylabel("teacher per-prototype spread across views")
    koleo = _series(train, "koleo")
    if koleo is not None:
        twin = ax.twinx()
        twin.plot(steps, koleo, color="tab:gray", label="koleo")
        twin.set_ylabel("KoLeo term")
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles])


def plot_loss_curves(log_path: Path, out_path: Path) -> Optional[Path]:
    """Write :func:`loss_figure` of the log at ``log_path`` to ``out_path`` (PNG); None when the log has no train
    record yet."""
    records = read_log(log_path)
    if not any(r.get("event") == "train" for r in records):
        return None
    plt = _pyplot()
    fig, _ = loss_figure(records)
    atomic_write(out_path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)
    return out_path


def plot_reconstruction(preview: Dict[str, Optional[torch.Tensor]], out_path: Path, title: str = "") -> Path:
    """Middle axial slice of the input, the masked view, the reconstruction and the reconstruction pasted into
    the masked cubes. ``preview`` holds (D, H, W) tensors ``input``, ``mask`` (bool) and ``reconstruction``."""
    plt = _pyplot()
    image = preview["input"].numpy()
    mask = preview["mask"].numpy().astype(bool)
    recon = preview.get("reconstruction")
    z = image.shape[0] // 2
    panels = [("input", image[z]), ("masked view", np.where(mask[z], np.nan, image[z]))]
    if recon is not None:
        rec = recon.numpy()
        panels.append(("reconstruction", rec[z]))
        panels.append(("visible + reconstructed", np.where(mask[z], rec[z], image[z])))
    vmin, vmax = float(np.nanmin(image)), float(np.nanmax(image))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    for ax, (name, data) in zip(np.atleast_1d(axes), panels):
        ax.imshow(data, cmap="gray", vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1)
        ax.set_title(name)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_write(out_path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)
    return out_path
