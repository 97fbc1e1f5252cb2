"""The study's outputs: ``study.json`` (every trained arm), ``study.md`` (mean +- sd table) and ``study.png``."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from nnunet_smit.files import atomic_write


def _write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_study_json(path: Path, header: Dict[str, Any], rows: List[Dict[str, Any]]) -> None:
    """``{**header, "rows": rows}``, written atomically (a killed study never leaves half a file)."""
    _write_text_atomic(Path(path), json.dumps({**header, "rows": rows}, indent=2) + "\n")


def summarise(rows: Sequence[Dict[str, Any]], key: str = "arm") -> Dict[Tuple[str, int], Tuple[float, float, int]]:
    """(row[key], labelled) -> (mean Dice, sample sd over seeds (0 for one seed), number of seeds with a Dice)."""
    groups: Dict[Tuple[str, int], List[float]] = defaultdict(list)
    for row in rows:
        if row.get("dice") is not None:
            groups[(row[key], int(row["labelled"]))].append(float(row["dice"]))
    return {key: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v))
            for key, v in groups.items()}


def markdown_table(rows: Sequence[Dict[str, Any]], arms: Sequence[str], labelled: Sequence[int],
                   key: str = "arm") -> str:
    """Mean +- sd Dice on the held-out set: one row per arm (``row[key]``), one column per number of labelled cases."""
    stats = summarise(rows, key)
    lines = [f"| {key} | " + " | ".join(f"k={k}" for k in labelled) + " |",
             "|---|" + "---|" * len(labelled)]
    for arm in arms:
        cells = []
        for k in labelled:
            if (arm, k) in stats:
                mean, sd, n = stats[(arm, k)]
                cells.append(f"{mean:.3f} ± {sd:.3f} (n={n})")
            else:
                cells.append("–")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_study_md(path: Path, header: Dict[str, Any], rows: Sequence[Dict[str, Any]], arms: Sequence[str],
                   labelled: Sequence[int], added: Sequence[Tuple[str, int, int]] = ()) -> None:
    """The table with what it was measured on (dataset, test cases, seeds, budget) above it, what each arm is (plans,
    exported side of its encoder, a clipped HU window) and which rows this run added (``added``: (arm, k, seed))."""
    budget = header["budget"]
    text = [
        f"# smit_study: {header['dataset']} ({header['configuration']}, {header['plans']})",
        "",
        f"Mean ± sd (over seeds) of the foreground Dice on the held-out test set of {len(header['test_cases'])} "
        f"cases, by number of labelled training cases k; {header['seeds']} seed(s); budget "
        f"{budget['epochs'] or 'default'} epochs x {budget['iterations_per_epoch'] or 'default'} iterations; "
        f"device {header['device']}.",
        "",
        markdown_table(rows, arms, labelled),
        "",
        "Arms: " + "; ".join(_describe_arm(a, header, rows) for a in header["arms"]) + ".",
        "",
        (f"This run added {len(added)} row(s): " + ", ".join(f"{a} k={k} seed {s}" for a, k, s in added) + "; the "
         "others were trained earlier in this folder." if added else
         "This run added no row: every arm was trained earlier in this folder."),
    ]
    if header.get("clipped_window"):
        text += ["", "**Clipped HU window** (trained with --allow_clipped_window): the plans clip CT inside the encoder's "
                 "window for " + ", ".join(sorted(header["clipped_window"])) + "; their Dice is not the encoder's on "
                 "the input it was pretrained on."]
    if header.get("leakage"):
        text += ["", "**Leakage:** held-out cases seen in pretraining: "
                 + "; ".join(f"{enc}: {', '.join(sorted(cases))}" for enc, cases in header["leakage"].items())]
    _write_text_atomic(Path(path), "\n".join(text) + "\n")


def _describe_arm(arm: Dict[str, Any], header: Dict[str, Any], rows: Sequence[Dict[str, Any]]) -> str:
    """``name = encoder (trainer, plans[, exported side])`` for the arms line of study.md."""
    side = next((r.get("exported_side") for r in rows if r["arm"] == arm["name"] and r.get("exported_side")), None)
    details = [arm["trainer"], arm.get("plans") or header["plans"]] + ([f"{side} exported"] if side else [])
    return f"{arm['name']} = {arm['encoder']} ({', '.join(details)})"


def plot_study(path: Path, rows: Sequence[Dict[str, Any]], arms: Sequence[str], title: str, key: str = "arm") -> None:
    """Dice against labelled cases (log2 axis), one line per arm (``row[key]``), its spread (mean ± sd) shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summarise(rows, key)
    # nnU-Net's progress plot calls seaborn.set(font_scale=2.5) in this process: draw with matplotlib's defaults
    with plt.style.context("default"):
        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
        for arm in arms:
            ks = sorted(k for a, k in stats if a == arm)
            if not ks:
                continue
            mean = np.array([stats[(arm, k)][0] for k in ks])
            sd = np.array([stats[(arm, k)][1] for k in ks])
            line, = ax.plot(ks, mean, marker="o", label=arm)
            ax.fill_between(ks, mean - sd, mean + sd, color=line.get_color(), alpha=0.2)
            for row in rows:
                if row[key] == arm and row.get("dice") is not None:
                    ax.plot(row["labelled"], row["dice"], ".", color=line.get_color(), alpha=0.5)
        all_k = sorted({int(r["labelled"]) for r in rows})
        if all_k:
            ax.set_xscale("log", base=2)
            ax.set_xticks(all_k)
            ax.set_xticklabels([str(k) for k in all_k])
        ax.set_xlabel("labelled training cases")
        ax.set_ylabel("Dice on held-out cases (foreground mean)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
        plt.close(fig)
