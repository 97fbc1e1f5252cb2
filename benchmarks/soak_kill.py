"""kill -9 at any moment, many times: pretraining and fine-tuning must resume and end as if never killed.

Pretraining: a deterministic CPU run of the tiny preset on phantoms, killed with SIGKILL (the whole process group,
cache workers included) at chosen moments: while the cache is being built, while ``checkpoint_latest.pt`` or the
export is being written (the moment its temporary file appears), and at random moments between steps. After every
kill the same command is run again. At the end its export must equal, bit for bit, the export of the same run done
without interruption, and no temporary file may be left anywhere in the run folder.

Fine-tuning: ``nnUNetv2_train ... -tr nnUNetTrainerSMIT_tiny`` on a small generated dataset with the soak's export as
encoder, killed in its second epoch (after its first checkpoint), then ``--c``; its ``checkpoint_final.pth`` must
then serve ``nnUNetv2_predict``.

    python benchmarks/soak_kill.py --work /tmp/soak [--kills 12] [--seed 0] [--json out.json]

Not part of CI: a few minutes on 2 CPU cores. Prints one line per kill and a summary table (and JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RUN_ARGS = [
    "--preset", "tiny", "--view_size", "64", "--region_size", "80", "--batch_size", "2", "--samples_per_epoch", "4",
    "--epochs", "8", "--warmup_epochs", "1", "--teacher_temp_warmup_epochs", "1", "--head_hidden_dim", "64",
    "--head_bottleneck_dim", "32", "--head_out_dim", "128", "--num_workers", "0", "--cache_workers", "2",
    "--device", "cpu", "--deterministic", "--no_progress", "--checkpoint_every_steps", "2",
    "--preview_every_epochs", "0", "--log_every_steps", "1",
]
MODES = ("cache", "checkpoint", "step", "export")


def _env() -> Dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def pretrain_command(data: Path, out: Path) -> List[str]:
    return [sys.executable, "-m", "nnunet_smit.pretraining.cli", "-d", str(data), "-o", str(out), *RUN_ARGS]


def leftovers(folder: Path) -> List[str]:
    """Temporary files (this version's and earlier ones'), and a lock file that still names a holder."""
    from nnunet_smit.files import is_temporary

    found = [str(p.relative_to(folder)) for p in folder.rglob("*")
             if p.is_file() and (is_temporary(p.name) or p.name.startswith(".tmp-"))]
    for lock in (folder / ".smit_pretrain.lock", folder / "cache" / ".build.lock"):
        if lock.is_file() and lock.read_text().strip():
            found.append(f"{lock.relative_to(folder)} (still names a holder)")
    return found


def _moment_reached(mode: str, out: Path, clock: Dict[str, float], delay: float) -> Optional[str]:
    """What is happening when ``mode``'s moment has come, or None while it has not (``step``: ``delay`` seconds
    after this run's first logged step)."""
    cases = out / "cache" / "cases"
    if mode == "cache":
        # A running marker this run made: a worker is preprocessing a scan now.
        markers = [p for p in cases.glob(".*.running.tmp") if _newer(p, clock["started"])] if cases.is_dir() else []
        if markers and not (out / "log.jsonl").exists():
            return f"cache build, {sum(p.suffix == '.json' for p in cases.iterdir())} scans done"
        return None
    if mode in ("checkpoint", "export"):
        prefix = ".checkpoint_latest.pt." if mode == "checkpoint" else ".smit_encoder_teacher.pt."
        if any(p.name.startswith(prefix) and _newer(p, clock["started"]) for p in out.iterdir()):
            return f"writing {'checkpoint_latest.pt' if mode == 'checkpoint' else 'the export'}"
        return None
    log = out / "log.jsonl"
    lines = log.read_text().splitlines() if log.is_file() else []
    trained = [line for line in lines if '"event": "train"' in line]  # the last line may be half-written
    if len(trained) > clock.setdefault("records_before", len(trained)):
        clock.setdefault("training_since", time.time())
    if "training_since" in clock and time.time() - clock["training_since"] > delay:
        return f"training, {len(trained)} train records in the log"
    return None


def _newer(path: Path, than: float) -> bool:
    """Whether ``path`` was made after ``than`` (False once it is gone)."""
    try:
        return path.stat().st_mtime > than
    except FileNotFoundError:
        return False


def run_killed(command: List[str], out: Path, mode: str, rng: random.Random, timeout: float = 300) -> Dict:
    """Start ``command``, SIGKILL its process group at ``mode``'s moment; what happened."""
    started = time.time()
    delay = rng.uniform(0.0, 8.0)
    clock: Dict[str, float] = {"started": started}
    process = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    while process.poll() is None and time.time() - started < timeout:
        if out.is_dir():
            where = _moment_reached(mode, out, clock, delay)
            if where is not None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return {"mode": mode, "killed": True, "where": where, "after_s": round(time.time() - started, 1)}
        time.sleep(0.002)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return {"mode": mode, "killed": True, "where": "timeout", "after_s": round(time.time() - started, 1)}
    err = process.stderr.read().decode()[-500:]
    return {"mode": mode, "killed": False, "where": f"ended first (exit {process.returncode})", "error": err,
            "after_s": round(time.time() - started, 1)}


def soak_pretraining(work: Path, kills: int, seed: int) -> Dict:
    from nnunet_smit.checkpoint import load_encoder_checkpoint
    from nnunet_smit.pretraining.phantoms import generate_phantom_corpus

    data = work / "data"
    if not data.is_dir():
        generate_phantom_corpus(data, n_cases=4, seed=0)
    reference, soak = work / "reference", work / "soak"
    shutil.rmtree(soak, ignore_errors=True)
    if not (reference / "smit_encoder_teacher.pt").is_file():
        shutil.rmtree(reference, ignore_errors=True)
        subprocess.run(pretrain_command(data, reference), cwd=REPO, env=_env(), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    expected = load_encoder_checkpoint(reference / "smit_encoder_teacher.pt").sha256

    rng = random.Random(seed)
    # The cache first (it is built once), then the others in turn; the export's write comes last of all.
    plan = ["cache", "cache"] + [("checkpoint", "step")[i % 2] for i in range(max(kills - 3, 0))] + ["export"]
    events = []
    for mode in plan:
        if mode == "cache" and (soak / "cache" / "manifest.json").is_file() and \
                json.loads((soak / "cache" / "manifest.json").read_text()).get("complete"):
            mode = "step"
        event = run_killed(pretrain_command(data, soak), soak, mode, rng)
        event["left_after_kill"] = len(leftovers(soak))
        events.append(event)
        print(f"  kill {len(events):2d}: {event['mode']:<10} {event['where']:<45} after {event['after_s']:>5} s",
              flush=True)
    final = subprocess.run(pretrain_command(data, soak), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    exported = soak / "smit_encoder_teacher.pt"
    got = load_encoder_checkpoint(exported).sha256 if final.returncode == 0 and exported.is_file() else None
    return {
        "kills": sum(e["killed"] for e in events), "tries": len(events), "events": events,
        "final_exit": final.returncode, "final_error": final.stderr[-500:] if final.returncode else "",
        "export_sha256": got, "reference_sha256": expected, "bit_equal": got == expected,
        "leftovers": leftovers(soak),
    }


def soak_fine_tuning(work: Path, encoder: Path) -> Dict:
    """nnUNetv2_train killed in its second epoch, then --c, then nnUNetv2_predict with the final checkpoint."""
    from tests.trainers.synthetic_dataset import write_dataset

    root = work / "nnunet"
    shutil.rmtree(root, ignore_errors=True)
    dirs = {name: root / name for name in ("raw", "preprocessed", "results", "pred")}
    for folder in dirs.values():
        folder.mkdir(parents=True)
    dataset_id = 902
    dataset_name, test_images = write_dataset(dirs["raw"], dataset_id)
    env = {k: v for k, v in _env().items() if not k.startswith("nnUNet_")}
    env.update(nnUNet_raw=str(dirs["raw"]), nnUNet_preprocessed=str(dirs["preprocessed"]),
               nnUNet_results=str(dirs["results"]), nnUNet_def_n_proc="1", nnUNet_n_proc_DA="0", nnUNet_compile="f",
               nnUNet_SMIT_weights=str(encoder))
    subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", "3d_fullres", "-np", "1",
                    "-npfp", "1"], env={**env, "nnUNet_n_proc_DA": "1"}, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    train = ["nnUNetv2_train", str(dataset_id), "3d_fullres", "0", "-tr", "nnUNetTrainerSMIT_tiny", "-device", "cpu"]
    fold = dirs["results"] / dataset_name / "nnUNetTrainerSMIT_tiny__nnUNetPlans__3d_fullres" / "fold_0"
    # nnUNetTrainerSMIT_tiny runs 2 epochs; nnU-Net writes checkpoint_latest.pth at each epoch's end only every 50
    # epochs, and checkpoint_best.pth when the EMA Dice improves: kill in epoch 1, after epoch 0's log line.
    process = subprocess.Popen(train, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    killed_at = None
    for line in process.stdout:
        if "Epoch 1" in line:
            time.sleep(1.0)
            os.killpg(process.pid, signal.SIGKILL)
            killed_at = line.strip()
            break
    process.wait()
    checkpoints_then = sorted(p.name for p in fold.glob("checkpoint_*.pth"))
    resumed = subprocess.run(train + ["--c"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    continued = "continuing at epoch" in resumed.stdout or any(
        "continuing at epoch" in p.read_text() for p in fold.glob("training_log_*.txt"))
    predicted = subprocess.run(
        ["nnUNetv2_predict", "-i", str(test_images[0].parent), "-o", str(dirs["pred"]), "-d", str(dataset_id),
         "-c", "3d_fullres", "-tr", "nnUNetTrainerSMIT_tiny", "-f", "0", "-npp", "1", "-nps", "1", "--disable_tta",
         "-device", "cpu"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    predictions = sorted(p.name for p in dirs["pred"].glob("*.nii.gz"))
    return {
        "killed_at": killed_at, "checkpoints_at_kill": checkpoints_then, "resume_exit": resumed.returncode,
        "resumed_from_checkpoint": continued, "final_checkpoint": (fold / "checkpoint_final.pth").is_file(),
        "predict_exit": predicted.returncode, "predictions": len(predictions), "test_images": len(test_images),
        "leftovers": [str(p) for p in fold.rglob("*") if p.name.endswith((".tmp", ".partial"))],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="working folder (phantoms, runs, nnU-Net folders)")
    parser.add_argument("--kills", type=int, default=12, help="SIGKILLs of the pretraining run (at least 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill moments")
    parser.add_argument("--skip_fine_tuning", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    start = time.time()
    results = {"pretraining": soak_pretraining(args.work, args.kills, args.seed)}
    pre = results["pretraining"]
    print(f"pretraining: {pre['kills']} kills in {pre['tries']} tries; final run exit {pre['final_exit']}; export "
          f"{'bit-equal to' if pre['bit_equal'] else 'DIFFERENT from'} the uninterrupted run's; leftovers: "
          f"{pre['leftovers'] or 'none'}", flush=True)
    if not args.skip_fine_tuning:
        results["fine_tuning"] = soak_fine_tuning(args.work, args.work / "soak" / "smit_encoder_teacher.pt")
        fine = results["fine_tuning"]
        print(f"fine-tuning: killed at {fine['killed_at']!r} with {fine['checkpoints_at_kill']}; --c exit "
              f"{fine['resume_exit']} (resumed from a checkpoint: {fine['resumed_from_checkpoint']}); final "
              f"checkpoint {fine['final_checkpoint']}; predict exit {fine['predict_exit']}, "
              f"{fine['predictions']}/{fine['test_images']} predictions", flush=True)
    results["seconds"] = round(time.time() - start, 1)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    ok = pre["bit_equal"] and not pre["leftovers"] and pre["kills"] >= 10
    if "fine_tuning" in results:
        fine = results["fine_tuning"]
        ok = ok and fine["final_checkpoint"] and fine["predict_exit"] == 0 and fine["predictions"] == fine["test_images"]
    print("PASS" if ok else "FAIL", f"({results['seconds']} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
