"""Benchmark SMIT pretraining: training-step throughput per setting against an emulation of the authors' fp32
implementation, and data-loader throughput per worker count from the preprocessed cache, side by side.

The training step is the engine's real step (student + teacher forward, three losses, backward, clipping, AdamW,
EMA update) on a fixed batch already on the device, so it measures compute only; the loader is measured on its own
from the cache. A crop is one sample: one region of one scan, from which the step takes two views.

Training settings (``--settings``; each runs in its own subprocess, so its peak memory is its own, under
``--child_timeout`` seconds, and a failure or timeout becomes that row's error):
    authors        an emulation of the SMIT authors' fp32 training on this device: the same step with their
                   numerics: fp32, TF32 off for matmuls and cuDNN convolutions, no checkpointing, no compile, window
                   attention on the explicit math path (softmax(q k^T + bias) v in fp32, as the authors' code
                   computes it); the baseline of "vs authors"
    fp32           fp32 with PyTorch's defaults: matmuls in full fp32 (``torch.backends.cuda.matmul.allow_tf32``
                   False), cuDNN convolutions in TF32 on Ampere and later (``torch.backends.cudnn.allow_tf32``
                   True), ``cudnn.benchmark`` off, attention on the fused kernel SDPA picks; the baseline of "vs
                   fp32". The flags in effect are printed and stored with each setting.
    fp32+ckpt      the same with gradient checkpointing
    bf16           bf16 autocast: the engine's default on a GPU (``precision="auto"``)
    bf16+ckpt      the same with gradient checkpointing
    bf16+compile   bf16 with ``PretrainConfig.compile``: on one process the engine compiles the step's student,
                   teacher and losses as one graph with ``torch.compile``; the first step's time includes compiling
    bf16+compile+graphs  the same in ``torch.compile``'s "reduce-overhead" mode (CUDA graphs: the compiled graph
                   replayed with one launch); both compile settings are skipped with ``--no_compile``
    bf16+math      bf16 with window attention on the explicit path (scores materialised), against SDPA's choice
    bf16+cudnn     bf16 with cuDNN's attention kernel first where it takes the inputs (the additive bias with its
                   gradient), SDPA's next choice elsewhere; the profile's operator list shows which kernel ran

Goals, checked in the printout: the engine's default step >= 3x the authors' crops/s on the same GPU; the loader
>= 4x the fastest step's crops/s at the worker count used.

    python benchmarks/bench_pretrain.py                                # CPU: tiny preset, 64^3
    python benchmarks/bench_pretrain.py --device cuda --json out.json  # GPU: smit_small, 96^3, batch 6
    python benchmarks/bench_pretrain.py --cache /path/to/cache         # loader on a real cache

Reconstruction paths (``--reconstruct_through``, default all three of ``bottleneck,skips,decoder``; also
``skips-light`` and ``decoder-light``, the light decoder's blocks): the engine's default setting (fp32 on a CPU, bf16
on a GPU) runs once per path, side by side, and each path's step is counted in FLOPs (``torch.utils.flop_counter``, on
the meta device: nothing is computed) here and for smit_small at 96^3 with batch 6 and the full heads (the authors'
GPU run). The printout extrapolates a GPU's steps/s for each path from a measured bottleneck step
(``--gpu_bottleneck_steps_per_s``, the H200's bf16 figure of docs/performance.md) two ways: every FLOP at that step's
rate (the slowest it can be), and the added FLOPs at SMITNet's achieved convolution rate (``--gpu_conv_tflops``).

``--profile N`` profiles N more steps of each setting after timing them and prints, per setting, the step's wall
time against the device's busy time (the sum of its kernels' durations), kernel launches and host operations per
step, and the costliest kernels: whether the host or the device bounds the step. (Kernels replayed inside a CUDA
graph may be invisible to the profiler, so the busy time of the CUDA-graphs setting can read low.)

Without ``--cache`` a phantom corpus is generated and cached in a temporary folder first. ``--budget_s`` bounds the
whole run: settings are run by priority (authors, the default, the compiled settings, the loader, then the rest) and
those that no longer fit are reported as skipped; the JSON is rewritten after every subprocess, so a killed run
leaves its figures.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]

# name -> (precision, gradient checkpointing, torch.compile mode or None, authors' numerics, label in the table,
#          attention kernel: None for the one SDPA picks, "math" for the explicit path, "cudnn" to prefer cuDNN's)
SETTINGS: Dict[str, tuple] = {
    "authors": ("fp32", False, None, True, "authors-equivalent fp32 (math attention, no TF32)", "math"),
    "fp32": ("fp32", False, None, False, "fp32 (PyTorch defaults)", None),
    "fp32+ckpt": ("fp32", True, None, False, "fp32 + checkpointing", None),
    "bf16": ("bf16", False, None, False, "bf16", None),
    "bf16+ckpt": ("bf16", True, None, False, "bf16 + checkpointing", None),
    "bf16+compile": ("bf16", False, "default", False, "bf16 + torch.compile", None),
    "bf16+compile+graphs": ("bf16", False, "reduce-overhead", False, "bf16 + torch.compile, CUDA graphs", None),
    "bf16+math": ("bf16", False, None, False, "bf16, math attention", "math"),
    "bf16+cudnn": ("bf16", False, None, False, "bf16, cuDNN attention preferred", "cudnn"),
}
# Reconstruction paths: name -> (reconstruct_through, decoder kind).
PATHS: Dict[str, tuple] = {
    "bottleneck": ("bottleneck", "smit"),
    "skips": ("skips", "smit"),
    "decoder": ("decoder", "smit"),
    "skips-light": ("skips", "light"),
    "decoder-light": ("decoder", "light"),
}
# The GPU run the FLOPs are also counted for: the authors' preset, view and batch, full heads.
GPU_RUN = {"preset": "smit_small", "view": 96, "batch": 6}
# H200, 2026-11-26 (docs/performance.md): the bf16 pretraining step of smit_small at 96^3, batch 6 (SMIT's bottleneck
# head), and SMITNet's achieved bf16 rate in a 96^3 training step (its FLOPs are mostly 3D convolutions).
H200_BOTTLENECK_STEPS_PER_S = 6.03
H200_CONV_TFLOPS = 47.6
SPEEDUP_GOAL_VS_AUTHORS = 3.0
LOADER_GOAL_VS_STEP = 4.0
# A subprocess is not started with less time than this left in --budget_s.
MIN_CHILD_S = 15.0


def machine() -> Dict[str, str]:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "cpu_count": str(os.cpu_count()), "threads": str(torch.get_num_threads())}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = f"{props.total_memory / 2**30:.1f}"
        info["gpu_capability"] = f"sm{props.major}{props.minor}"
        info["cuda"] = str(torch.version.cuda)
    return info


def ensure_cache(cache: str, view: int, root: Path) -> str:
    if cache:
        return cache
    from nnunet_smit.conventions import PretrainPreprocessing
    from nnunet_smit.pretraining.cache import build_cache
    from nnunet_smit.pretraining.phantoms import generate_phantom_corpus

    generate_phantom_corpus(root / "data", n_cases=6, seed=0)
    build_cache([root / "data"], root / "cache", PretrainPreprocessing(), min_shape=(view,) * 3, num_workers=2)
    return str(root / "cache")


def numerics_flags() -> Dict[str, Any]:
    """The process-wide fp32 numerics switches in effect (what "PyTorch defaults" means on this install)."""
    import torch

    flags: Dict[str, Any] = {"float32_matmul_precision": torch.get_float32_matmul_precision(),
                             "cudnn_benchmark": torch.backends.cudnn.benchmark}
    try:  # the legacy getters refuse to answer once the newer fp32_precision API was used
        flags["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        flags["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    except RuntimeError as error:
        flags["tf32"] = f"unknown ({error})"
    return flags


def train_setting(args: argparse.Namespace, name: str) -> Dict:
    """Steps/s, crops/s and peak memory of one setting (run in a subprocess)."""
    import resource

    import torch

    from nnunet_smit.pretraining.cache import CacheIndex
    from nnunet_smit.pretraining.config import PretrainConfig
    from nnunet_smit.pretraining.trainer import PretrainTrainer

    setting, _, path = name.partition("@")
    through, decoder = PATHS[path or "bottleneck"]
    precision, checkpointing, compile_mode, authors, _, kernel = SETTINGS[setting]
    if authors:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    cache = CacheIndex.open(args.cache)
    heads = bench_heads(args)
    config = PretrainConfig(
        preset=args.preset, view_size=args.view, region_size=args.view + 32, batch_size=args.batch,
        precision=precision, gradient_checkpointing=checkpointing, compile=compile_mode is not None,
        compile_mode=compile_mode or "default", device=args.device, reconstruct_through=through, decoder=decoder,
        num_workers=0, progress=False, epochs=100, warmup_epochs=1, **heads,
    )
    with tempfile.TemporaryDirectory(prefix="smit_bench_run_") as out:
        trainer = PretrainTrainer(config, cache, Path(out))
        batch = torch.utils.data.default_collate(
            [trainer.dataset.sample(i % len(cache.case_ids), i) for i in range(args.batch)])
        # As the engine's loader delivers it: the views on the device, the cube masks on the host (the step counts
        # the masked tokens there and sends the masks along itself).
        batch = {k: v.to(trainer.device) if k == "views" else v for k, v in batch.items()}
        cuda = trainer.device.type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        attention = attention_kernel(kernel)
        with attention:
            start = time.perf_counter()
            trainer.train_step(batch)
            sync()
            first_step_s = time.perf_counter() - start
            # Compiled: step 1 eager, step 2 compiles, CUDA graphs record at the third call or later.
            warmup = max(args.warmup, 4) if compile_mode else args.warmup
            for _ in range(warmup - 1):
                trainer.train_step(batch)
            sync()
            # A compiled run's first step is eager and its second compiles: the warm-up holds the compile time.
            warmup_s = time.perf_counter() - start
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            for _ in range(args.steps):
                trainer.train_step(batch)
            sync()
            elapsed = time.perf_counter() - start
            profile = profile_steps(trainer, batch, args.profile, sync) if args.profile else {}
    memory = (torch.cuda.max_memory_allocated() / 2**20 if cuda
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
    steps_per_s = args.steps / elapsed
    return {"kind": "train", "setting": name, "reconstruct_through": through, "decoder": decoder,
            "precision": precision, "gradient_checkpointing": checkpointing,
            "compile": compile_mode, "attention": kernel or "sdpa default",
            "numerics": numerics_flags(), "steps_per_s": steps_per_s, "crops_per_s": steps_per_s * args.batch,
            "views_per_s": steps_per_s * args.batch * 2, "peak_memory_mb": memory, "first_step_s": first_step_s,
            "warmup_s": warmup_s, **profile}


def attention_kernel(kernel: Optional[str]) -> Any:
    """Context in which SDPA uses ``kernel``: None leaves SDPA's choice, "math" forces the explicit path, "cudnn"
    puts cuDNN's kernel first (SDPA falls back to the next one where cuDNN does not take the inputs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if kernel is None:
        return contextlib.nullcontext()
    if kernel == "math":
        return sdpa_kernel(SDPBackend.MATH)
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # a torch without priorities: the first usable of the list
        return sdpa_kernel(order)


def profile_steps(trainer: Any, batch: Dict[str, Any], steps: int, sync: Any) -> Dict[str, Any]:
    """Where a step's time goes: wall time per step against the device's busy time per step (the sum of its
    kernels' durations) under ``torch.profiler``, the number of kernel launches, and the costliest kernels.

    A device busy for a small share of the step means the host (issuing kernels, Python, synchronisation) bounds the
    step, not the device's arithmetic or memory.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(batch)
        sync()
        wall_ms = (time.perf_counter() - start) * 1000 / steps
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1000 / steps
    by_name: Dict[str, float] = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.time_range.elapsed_us() / 1000 / steps
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:8]
    host_ops = sum(1 for e in prof.events() if e.device_type.name == "CPU" and e.cpu_parent is None)
    # The operators whose kernels take the device's time, with their input shapes: what to make faster.
    ops = [e for e in prof.key_averages(group_by_input_shape=True) if e.self_device_time_total > 0]
    ops.sort(key=lambda e: -e.self_device_time_total)
    top_ops = [[e.key, str(e.input_shapes)[:100], e.count // steps, round(e.self_device_time_total / 1000 / steps, 3)]
               for e in ops[:15]]
    return {"profiled_wall_ms_per_step": wall_ms, "device_busy_ms_per_step": busy_ms if kernels else None,
            "kernels_per_step": len(kernels) / steps, "host_top_level_ops_per_step": host_ops / steps,
            "top_kernels_ms_per_step": [[name[:80], round(ms, 3)] for name, ms in top],
            "top_ops_ms_per_step": top_ops}


def step_flops(preset: str, view: int, batch: int, path: str, heads: Dict[str, int]) -> float:
    """FLOPs of one training step's forward and backward (student, teacher, heads, losses) for a reconstruction
    path, counted by ``torch.utils.flop_counter`` on the meta device (shapes only, nothing computed)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from nnunet_smit.architectures import SMITConfig
    from nnunet_smit.pretraining.masking import CubeMaskGenerator
    from nnunet_smit.pretraining.model import HeadConfig, SMITPretrainModel

    through, decoder = PATHS[path]
    head = HeadConfig(heads["head_hidden_dim"], heads["head_bottleneck_dim"], heads["head_out_dim"])
    model = SMITPretrainModel(SMITConfig.preset(preset), heads=head, reconstruct_through=through,
                              decoder=decoder).to("meta")
    views = torch.empty(batch, 2, 1, view, view, view, device="meta")
    masks = CubeMaskGenerator(16, 0.7)(batch * 2, (view,) * 3).view(batch, 2, *(view // 16,) * 3)
    counter = FlopCounterMode(display=False)
    with counter:
        model.compute_losses(views, masks, 0.04).total.backward()
    return float(counter.get_total_flops())


def flops_setting(args: argparse.Namespace, path: str) -> Dict:
    """A path's step FLOPs here (the bench's preset, view, batch and heads) and in the authors' GPU run."""
    full = dict(head_hidden_dim=2048, head_bottleneck_dim=256, head_out_dim=8192)
    here = step_flops(args.preset, args.view, args.batch, path, bench_heads(args))
    gpu = step_flops(GPU_RUN["preset"], GPU_RUN["view"], GPU_RUN["batch"], path, full)
    return {"kind": "flops", "path": path, "step_flops": here, "gpu_run_step_flops": gpu}


def bench_heads(args: argparse.Namespace) -> Dict[str, int]:
    if args.small_heads:
        return dict(head_hidden_dim=256, head_bottleneck_dim=64, head_out_dim=1024)
    return dict(head_hidden_dim=2048, head_bottleneck_dim=256, head_out_dim=8192)


def loader_setting(args: argparse.Namespace, workers: int) -> Dict:
    import torch

    from nnunet_smit.pretraining.cache import CacheIndex
    from nnunet_smit.pretraining.loader import ResumableSampler
    from nnunet_smit.pretraining.sampler import EpochShardSampler, TwoViewDataset, ViewSampling

    cache = CacheIndex.open(args.cache)
    dataset = TwoViewDataset(cache, ViewSampling((args.view,) * 3, (args.view + 32,) * 3))
    shard = EpochShardSampler(len(cache.case_ids), len(cache.case_ids) * args.batch, args.batch)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, sampler=ResumableSampler(shard, 0),
                                         num_workers=workers, prefetch_factor=4 if workers else None)
    iterator = iter(loader)
    # One batch per worker first, so the timed batches are produced while timing, not prefetched before.
    for _ in range(max(2, workers)):
        next(iterator)
    n = max(args.loader_batches, 3 * workers)
    start = time.perf_counter()
    for _ in range(n):
        next(iterator)
    elapsed = time.perf_counter() - start
    return {"kind": "loader", "workers": workers, "crops_per_s": n * args.batch / elapsed}


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def run_child(argv: List[str], timeout_s: float) -> Dict:
    """Run this script on one setting in its own session; its JSON line, or an error with stderr's last line."""
    process = subprocess.Popen([sys.executable, __file__, *argv], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    start = time.perf_counter()
    try:
        stdout, stderr = process.communicate(timeout=timeout_s if math.isfinite(timeout_s) else None)
    except subprocess.TimeoutExpired:
        _kill_group(process.pid)  # the group: compile workers too
        stdout, stderr = process.communicate()
        return {"error": f"timeout after {timeout_s:.0f} s", "stderr_tail": stderr[-2000:],
                "wall_s": time.perf_counter() - start}
    finally:
        if process.poll() is None:  # interrupted ourselves: leave no child running on the device
            _kill_group(process.pid)
    wall_s = time.perf_counter() - start
    lines = [line for line in stdout.strip().splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
        return {"error": f"exit {process.returncode}: {last[:160]}", "stderr_tail": stderr[-2000:], "wall_s": wall_s}
    return {**json.loads(lines[-1]), "wall_s": wall_s}


def label_of(name: str) -> str:
    """A training row's label: the setting's, and the reconstruction path after ``@`` when not the bottleneck."""
    setting, _, path = name.partition("@")
    return SETTINGS[setting][4] + (f", through {path}" if path else "")


def report_paths(args: argparse.Namespace, default: str, train: Dict[str, Dict], flops: Dict[str, Dict]) -> None:
    """The reconstruction paths side by side: measured steps/s here, FLOPs per step here and in the authors' GPU
    run, and the GPU's steps/s extrapolated from its measured bottleneck step."""
    rows = {path: train.get(default if path == "bottleneck" else f"{default}@{path}", {}) for path in args.paths}
    base = rows.get("bottleneck", {}).get("steps_per_s")
    base_flops = flops.get("bottleneck", {})
    ref, conv = args.gpu_bottleneck_steps_per_s, args.gpu_conv_tflops * 1e12
    run = f"{GPU_RUN['preset']} {GPU_RUN['view']}^3 batch {GPU_RUN['batch']}"
    print(f"\nreconstruction paths ({SETTINGS[default][4]} here; GPU: {run} from {ref:g} steps/s through the "
          f"bottleneck, added FLOPs at {args.gpu_conv_tflops:g} TFLOP/s)")
    print(f"{'path':<16}{'steps/s':>9}{'vs bottleneck':>15}{'GFLOP/step':>12}{'FLOPs x':>9}{'GPU TFLOP/step':>16}"
          f"{'GPU FLOPs x':>13}{'GPU steps/s (est.)':>20}")
    for path, result in rows.items():
        counted = flops.get(path, {})
        steps = result.get("steps_per_s")
        here, gpu = counted.get("step_flops"), counted.get("gpu_run_step_flops")
        gpu0 = base_flops.get("gpu_run_step_flops")
        estimate = "-"
        if gpu and gpu0:
            slowest = ref * gpu0 / gpu
            added = 1.0 / (1.0 / ref + (gpu - gpu0) / conv)
            estimate = f"{slowest:.2f} - {added:.2f}"
        print(f"{path:<16}{(f'{steps:.3f}' if steps else result.get('error', '-')):>9}{_ratio(steps, base):>15}"
              f"{(f'{here / 1e9:.0f}' if here else '-'):>12}{_ratio(here, base_flops.get('step_flops')):>9}"
              f"{(f'{gpu / 1e12:.2f}' if gpu else '-'):>16}{_ratio(gpu, gpu0):>13}{estimate:>20}")


def _ratio(value: Optional[float], base: Optional[float]) -> str:
    return f"{value / base:.2f}x" if value and base else "-"


def report(args: argparse.Namespace, info: Dict[str, str], train: Dict[str, Dict], loaders: List[Dict],
           flops: Dict[str, Dict]) -> Dict:
    """Print the tables and goals; returns the goal figures for the JSON."""
    gpu = args.device.startswith("cuda")
    print(f"\nmachine: {info.get('gpu', info['cpu'])}" + (f" ({info['gpu_memory_gib']} GiB, {info['gpu_capability']}, "
          f"CUDA {info['cuda']})" if gpu and "gpu" in info else "") + f"; {info['cpu_count']} CPUs; torch "
          f"{info['torch']}; python {info['python']}")
    print(f"setting: preset {args.preset}, views {args.view}^3 (regions {args.view + 32}^3), batch {args.batch} "
          f"scans x 2 views, device {args.device}, {args.steps} timed steps after {args.warmup} warm-up")
    fp32_flags = train.get("fp32", {}).get("numerics")
    if fp32_flags:
        print(f"fp32 defaults here: {fp32_flags}")
    authors = train.get("authors", {}).get("crops_per_s")
    fp32 = train.get("fp32", {}).get("crops_per_s")
    width = 52
    print(f"{'training step':<{width}}{'steps/s':>9}{'crops/s':>9}{'peak MiB':>10}{'warm-up s':>11}"
          f"{'vs fp32':>9}{'vs authors':>11}")
    for name, result in train.items():
        label = label_of(name)
        if "error" in result:
            print(f"{label:<{width}}{result['error']}")
            continue
        print(f"{label:<{width}}{result['steps_per_s']:>9.3f}{result['crops_per_s']:>9.2f}"
              f"{result['peak_memory_mb']:>10.0f}{result['warmup_s']:>11.1f}"
              f"{_ratio(result['crops_per_s'], fp32):>9}{_ratio(result['crops_per_s'], authors):>11}")
    profiled = {n: r for n, r in train.items() if "profiled_wall_ms_per_step" in r}
    if profiled:
        print(f"\n{'where a step goes (torch.profiler)':<{width}}{'wall ms':>9}{'busy ms':>9}{'busy':>7}"
              f"{'kernels':>9}{'host ops':>10}")
        for name, result in profiled.items():
            busy = result["device_busy_ms_per_step"]
            share = f"{busy / result['profiled_wall_ms_per_step']:.0%}" if busy is not None else "-"
            busy_text = f"{busy:.1f}" if busy is not None else "-"
            print(f"{label_of(name):<{width}}{result['profiled_wall_ms_per_step']:>9.1f}"
                  f"{busy_text:>9}{share:>7}{result['kernels_per_step']:>9.0f}"
                  f"{result['host_top_level_ops_per_step']:>10.0f}")
            for kernel, ms in result["top_kernels_ms_per_step"][:4]:
                print(f"    {ms:8.2f} ms  {kernel}")
            for op, shapes, calls, ms in result.get("top_ops_ms_per_step", [])[:12]:
                print(f"    {ms:8.2f} ms  {calls:4d} x {op} {shapes}")
        print("busy: the device's kernel time per step against the step's wall time; a low share means the host "
              "(launches, Python, waits) bounds the step")
    goals: Dict[str, Any] = {}
    default = "bf16" if gpu else "fp32"  # what precision="auto" trains in on this device
    ours = train.get(default, {}).get("crops_per_s")
    if ours and authors:
        speedup = ours / authors
        verdict = "PASS" if speedup >= SPEEDUP_GOAL_VS_AUTHORS else "FAIL"
        goals["default_vs_authors"] = {"setting": default, "speedup": speedup, "goal": SPEEDUP_GOAL_VS_AUTHORS,
                                       "pass": verdict == "PASS"}
        print(f"goal: the engine's default step ({default}) vs authors: {speedup:.2f}x -> {verdict} "
              f"(goal >= {SPEEDUP_GOAL_VS_AUTHORS:.0f}x)")
    timed = {name: r["crops_per_s"] for name, r in train.items() if "crops_per_s" in r and "@" not in name}
    fastest_name = max(timed, key=timed.get) if timed else None
    fastest = timed.get(fastest_name, 0.0) if fastest_name else 0.0
    if fastest_name and authors:
        goals["fastest_vs_authors"] = {"setting": fastest_name, "speedup": fastest / authors}
        print(f"fastest step: {SETTINGS[fastest_name][4]}, {fastest / authors:.2f}x authors")
    print(f"\n{'data loader (workers)':<{width}}{'crops/s':>9}{'vs fastest step':>17}{'goal':>7}")
    goals["loader"] = []
    for result in loaders:
        if "error" in result:
            print(f"{result['workers']:<{width}}{result['error']}")
            continue
        ratio = result["crops_per_s"] / fastest if fastest else None
        verdict = "-" if ratio is None else ("PASS" if ratio >= LOADER_GOAL_VS_STEP else "FAIL")
        goals["loader"].append({"workers": result["workers"], "vs_fastest_step": ratio, "pass": verdict == "PASS"})
        print(f"{result['workers']:<{width}}{result['crops_per_s']:>9.2f}{_ratio(result['crops_per_s'], fastest):>17}"
              f"{verdict:>7}")
    print(f"goal: loader crops/s >= {LOADER_GOAL_VS_STEP:.0f}x the fastest step's at the worker count used")
    if len(args.paths) > 1:
        report_paths(args, default, train, flops)
    return goals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default=None, help="default: tiny on CPU, smit_small on GPU")
    parser.add_argument("--view", type=int, default=None, help="default: 64 on CPU, 96 on GPU")
    parser.add_argument("--batch", type=int, default=None, help="default: 2 on CPU, 6 on GPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 4 on CPU, 20 on GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 on CPU, 5 on GPU)")
    parser.add_argument("--settings", default=None, help=f"comma-separated, of {', '.join(SETTINGS)} (default: "
                        "authors, fp32, fp32+ckpt on CPU; all on GPU)")
    parser.add_argument("--no_compile", action="store_true", help="skip the torch.compile setting")
    parser.add_argument("--workers", default=None,
                        help="loader worker counts (default: 0,1,2 on CPU, 0,1,2,4,8 on GPU)")
    parser.add_argument("--loader_batches", type=int, default=20)
    parser.add_argument("--small_heads", action="store_true", help="1024 prototypes instead of 8192")
    parser.add_argument("--cache", default="")
    parser.add_argument("--child_timeout", type=float, default=None,
                        help="seconds per subprocess before it is killed (default: 240 on GPU, 600 on CPU)")
    parser.add_argument("--budget_s", type=float, default=0.0, help="wall-clock bound of the whole run (0: none)")
    parser.add_argument("--profile", type=int, default=0,
                        help="after timing, profile N more steps per setting: device busy time vs wall time, kernels")
    parser.add_argument("--reconstruct_through", default="bottleneck,skips,decoder",
                        help=f"reconstruction paths timed side by side with the default setting, of {', '.join(PATHS)}")
    parser.add_argument("--gpu_bottleneck_steps_per_s", type=float, default=H200_BOTTLENECK_STEPS_PER_S,
                        help="a GPU's measured bottleneck step (smit_small, 96^3, batch 6) that the paths' GPU cost is "
                             "extrapolated from (default: the H200's, docs/performance.md)")
    parser.add_argument("--gpu_conv_tflops", type=float, default=H200_CONV_TFLOPS,
                        help="the rate the added convolution FLOPs are assumed to run at on that GPU (default: SMITNet's "
                             "achieved bf16 rate on the H200)")
    parser.add_argument("--json", default="")
    parser.add_argument("--_child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    args.preset = args.preset or ("smit_small" if gpu else "tiny")
    args.view = args.view or (96 if gpu else 64)
    args.batch = args.batch or (6 if gpu else 2)
    args.steps = args.steps or (20 if gpu else 4)
    args.warmup = max(args.warmup if args.warmup is not None else (5 if gpu else 1), 1)
    args.paths = list(dict.fromkeys(args.reconstruct_through.split(",")))
    if any(path not in PATHS for path in args.paths):
        parser.error(f"unknown reconstruction path in {args.reconstruct_through}; choose from {', '.join(PATHS)}")

    if args._child:
        kind, value = args._child.split(":", 1)
        run = {"train": train_setting, "flops": flops_setting}.get(kind)
        print(json.dumps(run(args, value) if run else loader_setting(args, int(value))))
        return

    start = time.monotonic()
    deadline = start + args.budget_s if args.budget_s > 0 else math.inf
    child_timeout = args.child_timeout or (240.0 if gpu else 600.0)
    names = (args.settings.split(",") if args.settings else
             list(SETTINGS) if gpu else ["authors", "fp32", "fp32+ckpt"])
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    names = [n for n in names if not (args.no_compile and SETTINGS[n][2] is not None)]
    workers = [int(w) for w in (args.workers or ("0,1,2,4,8" if gpu else "0,1,2")).split(",")]
    # SIGTERM (e.g. from `timeout`) unwinds through run_child, which then kills the running subprocess's group.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    info = machine()
    print(f"machine: {info}", flush=True)
    with tempfile.TemporaryDirectory(prefix="smit_bench_") as tmp:
        args.cache = ensure_cache(args.cache, args.view, Path(tmp))
        common = ["--device", args.device, "--preset", args.preset, "--view", str(args.view), "--batch",
                  str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup), "--cache", args.cache,
                  "--loader_batches", str(args.loader_batches), "--profile", str(args.profile)] + (
                     ["--small_heads"] if args.small_heads else [])
        # By priority (what --budget_s cuts last): the baseline, the default, the compiled steps (the candidates
        # for the speed goal), the loader, then the other settings.
        default = "bf16" if gpu else "fp32"
        core = [n for n in ("authors", default) if n in names] + [n for n in names if SETTINGS[n][2] is not None]
        # The reconstruction paths next: the default setting through each, and their FLOPs.
        paths = [f"{default}@{p}" for p in args.paths if p != "bottleneck"] if default in names else []
        counted = args.paths if len(args.paths) > 1 else []
        jobs = ([("train", n) for n in dict.fromkeys(core)] + [("train", n) for n in paths]
                + [("flops", p) for p in counted] + [("loader", w) for w in workers]
                + [("train", n) for n in names if n not in core])
        train: Dict[str, Dict] = {n: {"error": "not run"} for n in names + paths}
        flops: Dict[str, Dict] = {}
        loaders: List[Dict] = []
        for kind, value in jobs:
            left = deadline - time.monotonic()
            if left < MIN_CHILD_S:
                result = {"error": "skipped: --budget_s spent"}
            else:
                result = run_child(common + ["--_child", f"{kind}:{value}"], min(child_timeout, left))
            if kind == "train":
                train[value] = result
            elif kind == "flops":
                flops[value] = result
            else:
                loaders.append({**result, "workers": value})
            shown = (f"{result['crops_per_s']:.2f} crops/s" if "crops_per_s" in result else
                     f"{result['step_flops'] / 1e9:.0f} GFLOP/step" if "step_flops" in result else result["error"])
            print(f"[{time.monotonic() - start:6.1f} s] {kind} {value}: {shown}", flush=True)
            if args.json:
                write_json(args, info, train, loaders, flops, {})
        goals = report(args, info, train, loaders, flops)
    if args.json:
        write_json(args, info, train, loaders, flops, goals)


def write_json(args: argparse.Namespace, info: Dict[str, str], train: Dict[str, Dict], loaders: List[Dict],
               flops: Dict[str, Dict], goals: Dict) -> None:
    payload = {"machine": info, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "preset": args.preset,
               "view": args.view, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
               "device": args.device, "train": [{"setting": n, "label": label_of(n), **r} for n, r in train.items()],
               "loader": loaders, "flops": flops, "goals": goals}
    Path(args.json).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
