"""Benchmark SMIT pretraining: training-step throughput per precision/checkpointing setting, and data-loader
throughput per worker count from the preprocessed cache, side by side.

The training step is the engine's real step (student + teacher forward, three losses, backward, clipping, AdamW,
EMA update) on a fixed batch already on the device, so it measures compute only; the loader is measured on its own
from the cache. The loader keeps up when its crops/s is at least the step's crops/s (goal: 4x).
Each training setting runs in its own subprocess so its peak memory is its own.

    python benchmarks/bench_pretrain.py                                # CPU: tiny preset, 64^3, fp32
    python benchmarks/bench_pretrain.py --device cuda --preset smit_small --view 96 --batch 6 --json out.json
    python benchmarks/bench_pretrain.py --cache /path/to/cache         # loader on a real cache

Without ``--cache`` a phantom corpus is generated and cached in a temporary folder first.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]


def machine() -> Dict[str, str]:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "cpu_count": str(os.cpu_count()), "threads": str(torch.get_num_threads())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def ensure_cache(cache: str, view: int) -> str:
    if cache:
        return cache
    from nnunet_smit.conventions import PretrainPreprocessing
    from nnunet_smit.pretraining.cache import build_cache
    from nnunet_smit.pretraining.phantoms import generate_phantom_corpus

    root = Path(tempfile.mkdtemp(prefix="smit_bench_"))
    generate_phantom_corpus(root / "data", n_cases=6, seed=0)
    build_cache([root / "data"], root / "cache", PretrainPreprocessing(), min_shape=(view,) * 3, num_workers=2)
    return str(root / "cache")


def train_setting(args: argparse.Namespace, precision: str, checkpointing: bool) -> Dict:
    """Steps/s, crops/s and peak memory of one setting (run in a subprocess)."""
    import resource

    import torch

    from nnunet_smit.pretraining.cache import CacheIndex
    from nnunet_smit.pretraining.engine import PretrainConfig, PretrainTrainer

    cache = CacheIndex.open(args.cache)
    heads = dict(head_hidden_dim=2048, head_bottleneck_dim=256, head_out_dim=8192) if not args.small_heads else \
        dict(head_hidden_dim=256, head_bottleneck_dim=64, head_out_dim=1024)
    config = PretrainConfig(
        preset=args.preset, view_size=args.view, region_size=args.view + 32, batch_size=args.batch,
        precision=precision, gradient_checkpointing=checkpointing, device=args.device, num_workers=0,
        progress=False, epochs=100, warmup_epochs=1, **heads,
    )
    out = Path(tempfile.mkdtemp(prefix="smit_bench_run_"))
    trainer = PretrainTrainer(config, cache, out)
    batch = torch.utils.data.default_collate([trainer.dataset.sample(i % len(cache.case_ids), i) for i in range(args.batch)])
    batch = {k: v.to(trainer.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        trainer.train_step(batch)
    sync()
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step(batch)
    sync()
    elapsed = time.perf_counter() - start
    memory = (torch.cuda.max_memory_allocated() / 2**20 if trainer.device.type == "cuda"
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
    steps_per_s = args.steps / elapsed
    return {"kind": "train", "precision": precision, "gradient_checkpointing": checkpointing,
            "steps_per_s": steps_per_s, "crops_per_s": steps_per_s * args.batch,
            "views_per_s": steps_per_s * args.batch * 2, "peak_memory_mb": memory}


def loader_setting(args: argparse.Namespace, workers: int) -> Dict:
    import torch

    from nnunet_smit.pretraining.cache import CacheIndex
    from nnunet_smit.pretraining.engine import _ResumableSampler
    from nnunet_smit.pretraining.sampler import EpochShardSampler, TwoViewDataset, ViewSampling

    cache = CacheIndex.open(args.cache)
    dataset = TwoViewDataset(cache, ViewSampling((args.view,) * 3, (args.view + 32,) * 3))
    shard = EpochShardSampler(len(cache.case_ids), len(cache.case_ids) * args.batch, args.batch)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, sampler=_ResumableSampler(shard, 0),
                                         num_workers=workers, prefetch_factor=4 if workers else None)
    iterator = iter(loader)
    for _ in range(2):
        next(iterator)
    n = max(args.loader_batches, 2 * workers)
    start = time.perf_counter()
    for _ in range(n):
        next(iterator)
    elapsed = time.perf_counter() - start
    return {"kind": "loader", "workers": workers, "crops_per_s": n * args.batch / elapsed}


def run_child(argv: List[str]) -> Dict:
    result = subprocess.run([sys.executable, __file__, *argv], cwd=REPO, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        return {"error": f"exit {result.returncode}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default=None, help="default: tiny on CPU, smit_small on GPU")
    parser.add_argument("--view", type=int, default=None, help="default: 64 on CPU, 96 on GPU")
    parser.add_argument("--batch", type=int, default=None, help="default: 2 on CPU, 6 on GPU")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--workers", default="0,1,2", help="loader worker counts")
    parser.add_argument("--loader_batches", type=int, default=20)
    parser.add_argument("--small_heads", action="store_true", help="1024 prototypes instead of 8192")
    parser.add_argument("--cache", default="")
    parser.add_argument("--json", default="")
    parser.add_argument("--_child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    args.preset = args.preset or ("smit_small" if gpu else "tiny")
    args.view = args.view or (96 if gpu else 64)
    args.batch = args.batch or (6 if gpu else 2)
    args.steps = args.steps or (20 if gpu else 4)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)

    if args._child:
        kind, value, extra = (args._child.split(":") + [""])[:3]
        if kind == "train":
            print(json.dumps(train_setting(args, value, extra == "ckpt")))
        else:
            print(json.dumps(loader_setting(args, int(value))))
        return

    args.cache = ensure_cache(args.cache, args.view)
    common = ["--device", args.device, "--preset", args.preset, "--view", str(args.view), "--batch", str(args.batch),
              "--steps", str(args.steps), "--warmup", str(args.warmup), "--cache", args.cache,
              "--loader_batches", str(args.loader_batches)] + (["--small_heads"] if args.small_heads else [])
    settings = [("fp32", False), ("fp32", True)] + ([("bf16", False), ("bf16", True)] if gpu else [])
    train = [dict(run_child(common + ["--_child", f"train:{p}:{'ckpt' if c else ''}"]), precision=p,
                  gradient_checkpointing=c) for p, c in settings]
    loaders = [run_child(common + ["--_child", f"loader:{w}"]) for w in (int(w) for w in args.workers.split(","))]

    print(f"machine: {machine()}")
    print(f"setting: preset {args.preset}, views {args.view}^3 (regions {args.view + 32}^3), batch {args.batch} "
          f"scans x 2 views, device {args.device}")
    base = train[0].get("crops_per_s")
    print(f"{'training step':<28}{'steps/s':>10}{'crops/s':>10}{'peak MiB':>10}{'vs fp32':>9}")
    for r in train:
        if "error" in r:
            print(f"{r['precision'] + (' +ckpt' if r['gradient_checkpointing'] else ''):<28}{r['error']:>10}")
            continue
        name = r["precision"] + (" + checkpointing" if r["gradient_checkpointing"] else "")
        print(f"{name:<28}{r['steps_per_s']:>10.3f}{r['crops_per_s']:>10.2f}{r['peak_memory_mb']:>10.0f}"
              f"{r['crops_per_s'] / base:>8.2f}x")
    fastest = max((r.get("crops_per_s", 0.0) for r in train), default=0.0)
    print(f"{'data loader':<28}{'crops/s':>10}{'vs fastest step':>18}")
    for r in loaders:
        if "error" in r:
            continue
        print(f"{str(r['workers']) + ' workers':<28}{r['crops_per_s']:>10.2f}{r['crops_per_s'] / fastest:>17.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "preset": args.preset, "view": args.view,
                                               "batch": args.batch, "train": train, "loader": loaders}, indent=2))


if __name__ == "__main__":
    main()
