"""Does the DINO/iBOT teacher stay sharp and input-dependent? Pretraining runs with different settings side by side.

Each setting is one ``smit_pretrain`` run on the same cache (phantoms unless ``--data`` is given) with the same
schedule; the table shows, at a few points of the runs, the teacher's global-output entropy (log K = uniform, i.e.
collapsed to uniform), its per-prototype spread across the batch's views times K (0 = every view alike), and the loss
terms. A teacher that works has entropy clearly below log K and a spread of order 1 or more.

    python benchmarks/bench_collapse.py --device cuda --steps 400 \\
        --setting "no_koleo=--weight_koleo 0" --setting "default="
    python benchmarks/bench_collapse.py --device cpu --preset tiny --view 64 --batch 2 --steps 40 --small_heads

Settings run one after the other, or all at once on one GPU with ``--parallel`` (quality figures only, no timings).
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

TERMS = ("dino", "ibot", "reconstruction", "koleo")


def parse_setting(text: str) -> Tuple[str, List[str]]:
    name, _, options = text.partition("=")
    if not name:
        raise SystemExit(f"--setting needs NAME=OPTIONS, got {text!r}")
    return name, shlex.split(options)


def base_command(args: argparse.Namespace, data: Path, cache: Path) -> List[str]:
    command = [
        sys.executable, "-m", "nnunet_smit.pretraining.cli", "-d", str(data), "--cache_dir", str(cache),
        "--preset", args.preset, "--view_size", str(args.view), "--region_size", str(args.view + 32),
        "--batch_size", str(args.batch), "--device", args.device, "--num_workers", str(args.workers),
        "--samples_per_epoch", str(args.samples_per_epoch), "--max_steps", str(args.steps),
        "--log_every_steps", str(args.log_every), "--preview_every_epochs", "0", "--no_progress",
        "--checkpoint_every_steps", str(args.steps),
    ]
    if args.small_heads:
        command += ["--head_hidden_dim", "256", "--head_bottleneck_dim", "64", "--head_out_dim", "1024"]
    return command


def train_records(out_dir: Path) -> List[Dict]:
    """The training records of a run's log (a line cut off by the stop at the budget is skipped)."""
    from nnunet_smit.pretraining.plots import read_log

    return [r for r in read_log(out_dir / "log.jsonl") if r.get("event") == "train"]


def config_value(out_dir: Path, key: str, default):
    path = out_dir / "pretrain_config.json"
    if not path.is_file():
        return default
    return json.loads(path.read_text()).get(key, default)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", action="append", default=[], help="NAME=smit_pretrain options (repeatable)")
    parser.add_argument("--data", default="", help="CT folder (default: generated phantoms)")
    parser.add_argument("--phantoms", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="smit_small")
    parser.add_argument("--view", type=int, default=96)
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--samples_per_epoch", type=int, default=48)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--log_every", type=int, default=10)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--small_heads", action="store_true", help="1024 prototypes instead of 8192")
    parser.add_argument("--parallel", action="store_true", help="run all settings at once")
    parser.add_argument("--budget_s", type=float, default=0,
                        help="stop the runs (SIGINT: they save and exit) after this many seconds; report their logs")
    parser.add_argument("--out", default="", help="folder of the runs (default: a temporary folder)")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    settings = [parse_setting(s) for s in (args.setting or ["no_koleo=--weight_koleo 0", "default="])]

    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="smit_collapse_"))
    root.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else root / "phantoms"
    if not args.data and not any(data.glob("*.nii.gz")):
        from nnunet_smit.pretraining.phantoms import generate_phantom_corpus

        generate_phantom_corpus(data, n_cases=args.phantoms, seed=0)
    cache = root / "cache"
    start = time.perf_counter()
    subprocess.run(base_command(args, data, cache) + ["-o", str(root / "cache_run"), "--cache_only"], check=True,
                   stdout=subprocess.DEVNULL)
    print(f"cache ready in {time.perf_counter() - start:.0f} s: {cache}", flush=True)

    deadline = time.perf_counter() + args.budget_s if args.budget_s > 0 else math.inf

    def finish(process: subprocess.Popen) -> int:
        """Wait for a run; past the deadline, interrupt it (it saves its state and stops) and then kill it."""
        try:
            return process.wait(timeout=max(deadline - time.perf_counter(), 0) if deadline < math.inf else None)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGINT)
            try:
                return process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                return process.wait()

    runs = []
    for name, options in settings:
        out = root / name
        log = open(root / f"{name}.stderr.txt", "w")
        runs.append((name, out, log, subprocess.Popen(base_command(args, data, cache) + ["-o", str(out)] + options,
                                                       stdout=subprocess.DEVNULL, stderr=log)))
        if not args.parallel:
            finish(runs[-1][3])
    results = {}
    for name, out, log, process in runs:
        code = finish(process)
        log.close()
        results[name] = {"exit": code, "records": train_records(out), "options": dict(settings)[name],
                         "out_dim": config_value(out, "head_out_dim", 1024 if args.small_heads else 8192)}
        if code and code != 130:  # 130: stopped at the budget
            tail = (root / f"{name}.stderr.txt").read_text().strip().splitlines()[-1:]
            print(f"{name}: exit {code}: {tail[0] if tail else ''}")

    print(f"preset {args.preset}, views {args.view}^3, batch {args.batch}, {args.steps} steps, device {args.device}, "
          f"data {'phantoms x%d' % args.phantoms if not args.data else args.data}")
    header = f"{'setting':<10}{'step':>6}{'entropy/logK':>14}{'spread*K':>10}" + "".join(f"{t:>16}" for t in TERMS)
    print(header)
    for name, result in results.items():
        records, k = result["records"], result["out_dim"]
        if not records:
            continue
        marks = sorted({0, len(records) // 4, len(records) // 2, (3 * len(records)) // 4, len(records) - 1})
        for i in marks:
            r = records[i]
            terms = "".join(f"{r[t]:>16.4f}" if t in r else f"{'-':>16}" for t in TERMS)
            print(f"{name:<10}{r['step']:>6}{r.get('teacher_entropy', float('nan')) / math.log(k):>14.3f}"
                  f"{r.get('teacher_dim_std', float('nan')) * k:>10.2f}{terms}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
