"""``smit_demo -o OUT``: the whole chain on generated CT-like phantoms, with the public commands a user types.

1. A labelled nnU-Net raw dataset of phantoms (liver, spleen, kidneys), planned and preprocessed with
   ``nnUNetv2_plan_and_preprocess``, and with ``smit_plan --hu_window`` (the pretraining's HU window, unclipped).
2. ``smit_pretrain --demo --probe``: other phantoms without labels, the tiny preset pretrained on them, an encoder
   exported; the online probe scores the teacher on the labelled dataset during the run.
3. ``smit_study``: the pretrained encoder against the same network from random init and nnU-Net's default trainer,
   on nested sets of labelled cases, scored on held-out cases.
4. ``smit_probe``: linear probes of the frozen pretrained encoder, a random one and the input intensity, on the
   study's cases.
5. ``nnUNetv2_predict`` with the best arm on the held-out cases, Dice against their labels, and an overlay.

Everything lands under OUT; each step prints what it does and its command. Rerunning resumes: finished steps are
skipped (pretraining and the study resume themselves). With a CUDA GPU the demo trains longer (``GPU_SETTINGS``).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from nnunet_smit.conventions import PretrainPreprocessing
from nnunet_smit.errors import SMITError, run_cli

DATASET_ID = 990
DATASET_NAME = f"Dataset{DATASET_ID}_SMITDemo"
# Labelled phantoms are drawn from another seed than smit_pretrain --demo's, so no scan is in both.
LABELLED_SEED = 1000
# smit_plan's plans: the dataset preprocessed with the encoder's HU window (the SMIT arms train on them).
SMIT_PLANS = "nnUNetPlans_SMIT"
# The online probe during pretraining trains on this many labelled cases (smit_study's draw of seed 0).
ONLINE_PROBE_LABELLED = 1


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run.

    Attributes:
        labelled_cases: labelled phantoms in the nnU-Net dataset (a fifth is held out for testing).
        labelled: numbers of labelled training cases the study compares.
        seeds: draws of the labelled cases per number.
        epochs / iterations_per_epoch: the budget of every study arm.
        pretrain_args: extra ``smit_pretrain`` options on top of ``--demo``.
        disable_tta: score without mirroring (8x faster validation on a CPU).
        trainer: the SMIT trainer of the study (its Scratch twin trains the scratch arm).
        baselines: the study's baselines ("scratch", and "nnunet", nnU-Net's default trainer on its default plans).
        probe_seeds: draws of the labelled cases per number in smit_probe (cheaper than an arm: more seeds).
        nnunet_labelled: the numbers of labelled cases of nnU-Net's reference arm (None: every one of ``labelled``);
            its arms join the same study folder through a second ``smit_study`` call.
    """

    labelled_cases: int
    labelled: Sequence[int]
    seeds: int
    epochs: int
    iterations_per_epoch: int
    pretrain_args: Sequence[str] = ()
    disable_tta: bool = True
    trainer: str = "nnUNetTrainerSMIT"
    baselines: Sequence[str] = ("scratch", "nnunet")
    probe_seeds: int = 3
    nnunet_labelled: Optional[Sequence[int]] = None


# On a CPU: the smallest patch the encoder takes (64^3), a budget that only shows the chain working, and nnU-Net's
# reference arm (about 2 minutes each, 3x a SMIT arm) at k=1 only; docs/demo.md has the measured times.
CPU_SETTINGS = DemoSettings(labelled_cases=10, labelled=(1, 4), seeds=2, epochs=2, iterations_per_epoch=4,
                            trainer="nnUNetTrainerSMIT_64", nnunet_labelled=(1,))
GPU_SETTINGS = DemoSettings(labelled_cases=20, labelled=(1, 2, 4, 8), seeds=3, epochs=50, iterations_per_epoch=50,
                            pretrain_args=("--epochs", "200", "--samples_per_epoch", "64", "--batch_size", "4"),
                            disable_tta=False)


def study_commands(settings: DemoSettings, study_dir: Path, encoder: Path, device: str) -> List[List[str]]:
    """The ``smit_study`` calls of the demo, into one folder (its report holds every finished arm there): the
    encoder and its baselines at every k, and, when ``settings.nnunet_labelled`` narrows it, nnU-Net's reference arm
    at those k alone in a second call (same cases, seeds and budget)."""
    common = ["smit_study", "-d", str(DATASET_ID), "-o", str(study_dir), "--seeds", str(settings.seeds),
              "--trainer", settings.trainer, "-p", SMIT_PLANS, "--epochs", str(settings.epochs),
              "--iterations_per_epoch", str(settings.iterations_per_epoch), "-device", device] + (
        ["--disable_tta"] if settings.disable_tta else [])
    narrowed = "nnunet" in settings.baselines and settings.nnunet_labelled is not None \
        and list(settings.nnunet_labelled) != list(settings.labelled)
    baselines = [b for b in settings.baselines if not (narrowed and b == "nnunet")]
    commands = [common + ["--encoder", str(encoder), "--labelled", *map(str, settings.labelled),
                          "--baselines", *baselines]]
    if narrowed:
        commands.append(common + ["--labelled", *map(str, settings.nnunet_labelled), "--baselines", "nnunet"])
    return commands


def pretrained_arm(rows: Sequence[Dict], encoder: Path) -> str:
    """The study arm that fine-tuned ``encoder``: found by its rows' encoder file, since the report holds the arms of
    every call into the folder (``study.json``'s ``arms`` lists only the last call's)."""
    target = Path(encoder).resolve()
    for row in rows:
        if row["encoder"] not in ("scratch", "nnunet") and Path(row["encoder"]).resolve() == target:
            return row["arm"]
    raise SMITError(f"the study has no arm of the encoder {encoder}; see its study.md.")


def _say(message: str) -> None:
    print(f"[smit_demo] {message}", flush=True)


def _run(command: List[str], env: Dict[str, str], log: Path) -> str:
    """Run a public command with its output in ``log``, echoing its progress lines (``[smit_study] ...`` and
    tables); returns its last stdout line. A failure is a one-line SMITError naming the log."""
    _say("$ " + " ".join(shlex.quote(c) for c in command) + f"   (log: {log})")
    start = time.time()
    last = ""
    with open(log, "w", encoding="utf-8") as handle:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=handle, text=True,
                                   encoding="utf-8", errors="replace")
        for line in process.stdout:
            handle.write(line)
            if line.startswith(("[smit_study]", "|")):
                print("  " + line, end="", flush=True)
            last = line.strip() or last
        returncode = process.wait()
    if returncode != 0:
        tail = [line for line in log.read_text(encoding="utf-8").splitlines() if line.strip()][-1:] or ["(no output)"]
        raise SMITError(f"{command[0]} failed (exit {returncode}): {tail[0].strip()}; see {log}.")
    _say(f"  done in {time.time() - start:.0f} s")
    return last


def write_labelled_dataset(raw_root: Path, n_cases: int, seed: int = LABELLED_SEED) -> Path:
    """An nnU-Net raw dataset of ``n_cases`` labelled phantoms (``DEMO_PHANTOM`` sizes); returns its folder."""
    from nnunet_smit.pretraining.phantoms import (
        DEMO_PHANTOM,
        ORGAN_LABELS,
        generate_labelled_phantom,
        write_phantom_image,
    )

    folder = raw_root / DATASET_NAME
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_cases):
        image = folder / "imagesTr" / f"demo_{i:03d}_0000.nii.gz"
        labels = folder / "labelsTr" / f"demo_{i:03d}.nii.gz"
        if image.is_file() and labels.is_file():
            continue
        hu, organ_labels, spacing = generate_labelled_phantom(np.random.default_rng([seed, i]), **DEMO_PHANTOM)
        write_phantom_image(organ_labels, spacing, labels)
        write_phantom_image(hu, spacing, image)
    dataset_json = {"channel_names": {"0": "CT"}, "labels": ORGAN_LABELS, "numTraining": n_cases,
                    "file_ending": ".nii.gz", "name": "SMIT demo phantoms (liver, spleen, kidneys)"}
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2), encoding="utf-8")
    return folder


def dice_per_class(prediction: np.ndarray, reference: np.ndarray, labels: Dict[str, int]) -> Dict[str, float]:
    """Dice of every foreground label (1.0 when a label is absent from both)."""
    out = {}
    for name, value in labels.items():
        if value == 0:
            continue
        p, r = prediction == value, reference == value
        denominator = p.sum() + r.sum()
        out[name] = float(2 * np.logical_and(p, r).sum() / denominator) if denominator else 1.0
    return out


def report_table(markdown: Path) -> str:
    """The first markdown table of a report (study.md, probe.md)."""
    lines = markdown.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end])


def compare_arms(rows: Sequence[Dict], arm: str, baseline: str, key: str = "arm") -> str:
    """In words, per k: whether ``arm`` and ``baseline`` differ by more than their seed spread (mean +- sd over
    seeds of the held-out Dice), and in which direction. ``key``: the rows' name field ("arm" in smit_study's rows,
    "name" in smit_probe's)."""
    def stats(name: str, k: int):
        values = [r["dice"] for r in rows if r[key] == name and r["labelled"] == k and r.get("dice") is not None]
        return (float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0) if values else None

    parts = []
    for k in sorted({r["labelled"] for r in rows}):
        a, b = stats(arm, k), stats(baseline, k)
        if a is None or b is None:
            continue
        spread = max(a[1], b[1])
        verdict = ("above" if a[0] > b[0] else "below") if abs(a[0] - b[0]) > spread else "within the seed spread of"
        parts.append(f"k={k}: pretrained {a[0]:.3f} ± {a[1]:.3f} {verdict} {baseline} {b[0]:.3f} ± {b[1]:.3f}")
    return "; ".join(parts) + "." if parts else f"no k with both {arm} and {baseline}."


def best_row(rows: Sequence[Dict]) -> Dict:
    """The study row of the best arm: the (arm, k) with the highest mean held-out Dice over seeds, and of it the
    seed with the highest Dice (the one whose prediction the demo shows)."""
    scored = [r for r in rows if r.get("dice") is not None]
    if not scored:
        raise SMITError("no study arm has a held-out Dice (no foreground predicted or present); see the study log.")
    means: Dict = {}
    for r in scored:
        means.setdefault((r["arm"], r["labelled"]), []).append(r["dice"])
    arm, k = max(means, key=lambda key: float(np.mean(means[key])))
    return max((r for r in scored if r["arm"] == arm and r["labelled"] == k), key=lambda r: r["dice"])


def plot_overlay(image: np.ndarray, reference: np.ndarray, prediction: np.ndarray, path: Path, title: str) -> None:
    """Three orthogonal slices through the organs: CT (soft-tissue window), reference contours and prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    colours = ListedColormap([(0, 0, 0, 0), (0.85, 0.35, 0.2, 0.45), (0.3, 0.5, 0.95, 0.45), (0.3, 0.8, 0.3, 0.45)])
    z, y, x = (int(np.median(axis)) for axis in np.nonzero(reference)) if reference.any() else \
        (s // 2 for s in reference.shape)
    views = [("axial", np.s_[z, :, :]), ("coronal", np.s_[::-1, y, :]), ("sagittal", np.s_[::-1, :, x])]
    fig, axes = plt.subplots(2, 3, figsize=(11, 7), dpi=110)
    for column, (name, index) in enumerate(views):
        for row, (what, seg) in enumerate((("reference", reference), ("prediction", prediction))):
            ax = axes[row, column]
            ax.imshow(np.clip(image[index], -175, 250), cmap="gray", aspect="auto")
            ax.imshow(seg[index], cmap=colours, vmin=0, vmax=3, interpolation="nearest", aspect="auto")
            ax.contour(reference[index] > 0, levels=[0.5], colors="yellow", linewidths=0.6)
            ax.set_title(f"{name}: {what}", fontsize=9)
            ax.axis("off")
    fig.suptitle(title + "\nliver orange, spleen blue, kidneys green; yellow line: reference outline", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_demo(output: Path, device: str, settings: DemoSettings) -> Path:
    """The whole chain; returns the summary file (``OUT/demo_summary.md``)."""
    import SimpleITK as sitk

    from nnunet_smit.pretraining.phantoms import ORGAN_LABELS

    output = output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    logs = output / "logs"
    logs.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_") or k == "nnUNet_extTrainer"}
    env.update(nnUNet_raw=str(output / "nnUNet_raw"), nnUNet_preprocessed=str(output / "nnUNet_preprocessed"),
               nnUNet_results=str(output / "nnUNet_results"), nnUNet_compile="f", PYTHONUNBUFFERED="1",
               PYTHONIOENCODING="utf-8")
    if device == "cpu":
        env.update(nnUNet_def_n_proc="1", nnUNet_n_proc_DA="0")  # two cores: no worker processes
    start = time.time()

    _say(f"step 1/5: write {settings.labelled_cases} labelled phantoms as {DATASET_NAME}, plan and preprocess")
    raw = write_labelled_dataset(output / "nnUNet_raw", settings.labelled_cases)
    plans = output / "nnUNet_preprocessed" / DATASET_NAME / "nnUNetPlans.json"
    if not plans.is_file() or not (plans.parent / "nnUNetPlans_3d_fullres").is_dir():
        # nnU-Net's planner sets torch's threads to nnUNet_n_proc_DA, which must not be 0 there
        _run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1", "-npfp", "1"],
             {**env, "nnUNet_n_proc_DA": "1"}, logs / "plan_and_preprocess.log")
    else:
        _say("  planned and preprocessed earlier, skipped")
    smit_plans = output / "nnUNet_preprocessed" / DATASET_NAME / f"{SMIT_PLANS}.json"
    if not smit_plans.is_file() or not (smit_plans.parent / f"{SMIT_PLANS}_3d_fullres").is_dir():
        # the pretraining's whole HU window reaches the encoder: nnU-Net's default plans clip to the organs'
        # percentiles; written before pretraining, so that the online probe scores on them too
        window = [f"{v:g}" for v in PretrainPreprocessing().hu_window]
        _run(["smit_plan", "-d", str(DATASET_ID), "--hu_window", *window, "-np", "1"],
             {**env, "nnUNet_n_proc_DA": "1"}, logs / "smit_plan.log")
    else:
        _say(f"  {SMIT_PLANS} written earlier, skipped")

    _say(f"step 2/5: pretrain the tiny SMIT encoder on unlabelled phantoms (device {device}), probed online on "
         f"{DATASET_NAME}")
    encoder = Path(_run(["smit_pretrain", "--demo", "-o", str(output / "pretrain"), "--device", device,
                         "--no_progress", "--probe", str(DATASET_ID), "--probe_plans", SMIT_PLANS,
                         "--probe_labelled", str(ONLINE_PROBE_LABELLED),
                         *settings.pretrain_args], env, logs / "pretrain.log"))
    if not encoder.is_file():
        raise SMITError(f"smit_pretrain did not name its exported encoder (last line {str(encoder)!r}); see "
                        f"{logs / 'pretrain.log'}.")
    _say(f"  encoder: {encoder}")

    nnunet_at = (f" (k={', '.join(map(str, settings.nnunet_labelled))})"
                 if settings.nnunet_labelled is not None else "")
    _say("step 3/5: smit_study: pretrained vs scratch" + (f" vs nnU-Net default{nnunet_at}"
                                                          if "nnunet" in settings.baselines else "")
         + " on the same labelled cases")
    study_dir = output / "study"
    for number, command in enumerate(study_commands(settings, study_dir, encoder, device)):
        _run(command, env, logs / ("study.log" if number == 0 else "study_nnunet.log"))
    study = json.loads((study_dir / "study.json").read_text(encoding="utf-8"))

    _say("step 4/5: smit_probe: linear probes of the frozen pretrained encoder, a random one and the input "
         "intensity, on the same cases")
    probe_dir = output / "probe"
    _run(["smit_probe", "-d", str(DATASET_ID), "-o", str(probe_dir), "--encoder", str(encoder), "-p", SMIT_PLANS,
          "--labelled", *map(str, settings.labelled), "--seeds", str(settings.probe_seeds), "-device", device],
         env, logs / "probe.log")
    probe = json.loads((probe_dir / "probe.json").read_text(encoding="utf-8"))

    row = best_row(study["rows"])
    _say(f"step 5/5: nnUNetv2_predict the held-out cases with the best arm ({row['arm']}, k={row['labelled']}, "
         f"seed {row['seed']}: held-out Dice {row['dice']:.3f})")
    held_out = output / "held_out_images"
    shutil.rmtree(held_out, ignore_errors=True)
    held_out.mkdir()
    for case in study["test_cases"]:
        shutil.copy(raw / "imagesTr" / f"{case}_0000.nii.gz", held_out)
    predictions = output / "predictions"
    shutil.rmtree(predictions, ignore_errors=True)
    _run(["nnUNetv2_predict", "-i", str(held_out), "-o", str(predictions), "-d", str(DATASET_ID), "-c", "3d_fullres",
          "-tr", row["trainer"], "-p", row.get("plans", SMIT_PLANS), "-f", str(row["fold"]),
          "-chk", "checkpoint_final.pth", "-device", device,
          "-npp", "1", "-nps", "1"] + (["--disable_tta"] if settings.disable_tta else []),
         {**env, "nnUNet_results": str(study_dir / "arms" / row["arm"])}, logs / "predict.log")
    def array(path: Path) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))

    lines = []
    for case in study["test_cases"]:
        dice = dice_per_class(array(predictions / f"{case}.nii.gz"), array(raw / "labelsTr" / f"{case}.nii.gz"),
                              ORGAN_LABELS)
        cells = [f"{v:.3f}" for v in dice.values()] + [f"{np.mean(list(dice.values())):.3f}"]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    first = study["test_cases"][0]
    overlay = output / "overlay.png"
    first_dice = dice_per_class(array(predictions / f"{first}.nii.gz"), array(raw / "labelsTr" / f"{first}.nii.gz"),
                                ORGAN_LABELS)
    plot_overlay(array(raw / "imagesTr" / f"{first}_0000.nii.gz"), array(raw / "labelsTr" / f"{first}.nii.gz"),
                 array(predictions / f"{first}.nii.gz"), overlay,
                 f"{first}: nnUNetv2_predict, arm {row['arm']} fine-tuned on {row['labelled']} labelled cases; Dice "
                 + ", ".join(f"{name} {value:.2f}" for name, value in first_dice.items()))

    pretrain_dir = output / "pretrain"
    previews = sorted((pretrain_dir / "plots").glob("reconstruction_epoch*.png"))
    pngs = [p for p in [pretrain_dir / "plots" / "loss_curves.png", *previews[-1:]] if p.is_file()]
    organ_names = [n for n, v in ORGAN_LABELS.items() if v]
    pretrained = pretrained_arm(study["rows"], encoder)
    run_summary = pretrain_dir / "run_summary.json"
    pretraining = json.loads(run_summary.read_text(encoding="utf-8")) if run_summary.is_file() else {}
    recon, online = pretraining.get("recon_vs_best_baseline"), pretraining.get("online_probe") or {}
    probed = probe["encoders"][0]["name"]
    summary = "\n".join([
        "# smit_demo summary",
        "",
        "## Does pretraining help?",
        "",
        "- Fine-tuning (smit_study): " + compare_arms(study["rows"], pretrained, "scratch"),
        "- Frozen features (smit_probe): " + compare_arms(probe["rows"], probed, "random", key="name").replace(
            "pretrained", "pretrained encoder"),
        "- Against the input intensity alone: " + compare_arms(probe["rows"], probed, "intensity", key="name"),
        ("- Online probe of the teacher during pretraining (k={labelled}): Dice {first:.3f} at step {first_step}, "
         "{last:.3f} at step {step} ({probes} probe(s), {share:.1%} of the run's time).".format(
             labelled=ONLINE_PROBE_LABELLED, first=online["first_dice"], first_step=online["first_step"],
             last=online["dice"], step=online["step"], probes=online.get("probes", 0),
             share=online.get("share_of_run") or 0.0)
         if online.get("dice") is not None and online.get("first_dice") is not None else
         "- Online probe during pretraining: no score logged."),
        ("- Pretraining ended with a reconstruction L1 of {recon_l1:.3f} against {best_baseline_l1:.3f} for its best "
         "trivial predictor ({best_baseline}): ratio {ratio:.2f}.".format(**recon) if recon else
         "- Pretraining logged no reconstruction baseline."),
        "",
        f"## Held-out Dice of every arm (from {study_dir / 'study.md'})",
        "",
        report_table(study_dir / "study.md"),
        "",
        f"## Linear-probe Dice of the frozen encoders (from {probe_dir / 'probe.md'})",
        "",
        report_table(probe_dir / "probe.md"),
        "",
        f"## nnUNetv2_predict on the held-out cases with the best arm, {row['arm']} trained on k={row['labelled']} "
        f"labelled case(s) (seed {row['seed']}, fold {row['fold']})",
        "",
        "| case | " + " | ".join(organ_names) + " | mean |",
        "|---|" + "---|" * (len(organ_names) + 1),
        *lines,
        "",
        "## Pictures",
        "",
        f"- study plot: {study_dir / 'study.png'}",
        f"- probe plot: {probe_dir / 'probe.png'}",
        f"- prediction overlay: {overlay}",
        *[f"- pretraining: {p}" for p in pngs],
        "",
        f"Whole demo: {(time.time() - start) / 60:.1f} min on {device}.",
    ])
    summary_file = output / "demo_summary.md"
    summary_file.write_text(summary + "\n", encoding="utf-8")
    print(summary, flush=True)
    return summary_file


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="smit_demo",
        description="The whole chain on generated CT-like phantoms: nnU-Net planning, smit_pretrain with the online "
        "probe, smit_study (pretrained vs scratch vs nnU-Net default), smit_probe (pretrained vs random vs intensity) and "
        "nnUNetv2_predict; about 21 minutes on a 2-core CPU. Rerun the same command to resume.",
    )
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="demo folder")
    parser.add_argument("-device", "--device", choices=["cpu", "cuda"],
                        help="default cuda when available (larger settings), else cpu")
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = GPU_SETTINGS if device == "cuda" else CPU_SETTINGS
    return run_cli(lambda: run_demo(Path(args.output), device, settings), args.output,
                   "interrupted; rerun the same command to resume.")

if __name__ == "__main__":
    sys.exit(main())
