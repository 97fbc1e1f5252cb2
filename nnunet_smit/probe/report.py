"""The probe's outputs: ``probe.json`` (header and one row per encoder, k and seed), ``probe.md`` (mean ± sd over seeds,
one row per encoder, one column per k) and ``probe.png`` (Dice against k), all written atomically.

The table and the plot are ``smit_study``'s (:mod:`nnunet_smit.study.report`), keyed by the encoder's name.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Sequence

from nnunet_smit.files import atomic_write
from nnunet_smit.study.report import markdown_table, plot_study

KEY = "name"


def table(rows: Sequence[Dict[str, Any]], names: Sequence[str], labelled: Sequence[int]) -> str:
    """Mean ± sd of the held-out Dice over seeds: one row per encoder, one column per k."""
    return markdown_table(rows, names, labelled, key=KEY)


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_outputs(out: Path, header: Dict[str, Any], rows: List[Dict[str, Any]], names: Sequence[str]) -> None:
    """probe.json, probe.md and probe.png in ``out`` from the rows so far."""
    _write_text(out / "probe.json", json.dumps({**header, "rows": rows}, indent=2) + "\n")
    recipe = header["recipe"]
    described = "; ".join(f"{e['name']} = {e['encoder']} ({', '.join(e['scales'])})" for e in header["encoders"])
    text = [
        f"# smit_probe: {header['dataset']} ({header['configuration']}, {header['plans']})",
        "",
        f"Mean ± sd (over seeds) of nnU-Net's foreground Dice of a linear probe on frozen features, on the held-out "
        f"test set of {len(header['test_cases'])} cases (smit_study's), by number of labelled training cases k; "
        f"{header['seeds']} seed(s); {recipe['patches_per_case']} patches per case, {recipe['iterations']} steps; "
        f"device {header['device']}.",
        "",
        table(rows, names, header["labelled"]),
        "",
        f"Encoders: {described}.",
        "",
        "Baselines: `random` is the first encoder's architecture from random init, `intensity` the mapped input voxel "
        "alone, both with the same probe; an encoder is only as good as its margin over them.",
    ]
    _write_text(out / "probe.md", "\n".join(text) + "\n")
    plot_study(out / "probe.png", rows, names,
               f"{header['dataset']}: linear-probe Dice on {len(header['test_cases'])} held-out cases, "
               f"{header['seeds']} seed(s)", key=KEY)
