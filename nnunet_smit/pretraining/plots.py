"""PNG figures of a pretraining run: loss curves from the JSON-lines log and a reconstruction preview."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from nnunet_smit.files import atomic_write

logger = logging.getLogger(__name__)

LOSS_KEYS = ("loss", "dino", "ibot", "reconstruction")


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


def plot_loss_curves(log_path: Path, out_path: Path) -> Optional[Path]:
    """Plot every loss term, the learning rate and the teacher's collapse indicators against the step."""
    records = [r for r in read_log(log_path) if r.get("event") == "train"]
    if not records:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    steps = [r["step"] for r in records]
    for key in LOSS_KEYS:
        values = [r.get(key) for r in records]
        if all(v is None for v in values):
            continue
        axes[0].plot(steps, [np.nan if v is None else v for v in values], label=key)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss (unweighted terms, weighted total)")
    axes[0].set_yscale("log")
    axes[0].legend()
    axes[1].plot(steps, [r.get("lr") for r in records], label="lr")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("learning rate")
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    for key in ("teacher_entropy", "teacher_marginal_entropy"):
        values = [r.get(key) for r in records]
        if any(v is not None for v in values):
            axes[2].plot(steps, [np.nan if v is None else v for v in values], label=key)
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("teacher entropy (nats)")
    if axes[2].lines:
        axes[2].legend()
    # Collapse watch: the teacher's per-prototype spread across views (0: every view alike), and the KoLeo term
    # that keeps the embeddings apart (it may be negative, hence its own linear axis).
    spread = [r.get("teacher_dim_std") for r in records]
    if any(v is not None for v in spread):
        axes[3].plot(steps, [np.nan if v is None else v for v in spread], color="tab:purple", label="teacher spread")
        axes[3].set_yscale("log")
        axes[3].set_ylabel("teacher per-prototype spread across views")
    axes[3].set_xlabel("step")
    koleo = [r.get("koleo") for r in records]
    if any(v is not None for v in koleo):
        twin = axes[3].twinx()
        twin.plot(steps, [np.nan if v is None else v for v in koleo], color="tab:gray", label="koleo")
        twin.set_ylabel("KoLeo term")
        handles = axes[3].get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        axes[3].legend(handles, [h.get_label() for h in handles])
    fig.tight_layout()
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
