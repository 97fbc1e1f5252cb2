"""Benchmark SMITNet (authors' and light decoder) against MONAI SwinUNETR and nnU-Net's default PlainConvUNet.

SwinUNETR runs at feature size 48, PlainConvUNet with nnU-Net's 3d_fullres topology for the patch.

For each network and patch: forward time, forward+backward time, peak memory, FLOPs counted by
``torch.utils.flop_counter`` and the achieved FLOP rate; then ratios against the two baselines, measured
side by side in this one run. Each (network, patch) runs in its own subprocess so peak memory is its own.
``smit`` is SMITNet with the authors' decoder; ``smit_light`` the same encoder with ``decoder="light"`` and the
encoder's gradient checkpointing, as ``nnUNetTrainerSMITLight`` trains it; ``smit_light_no_checkpointing`` (on
request) the light network without checkpointing.

    python benchmarks/bench_network.py                      # CPU: smit_small at 96^3 and 128^3, fp32
    python benchmarks/bench_network.py --threads 1          # CPU shared with other jobs (see --threads)
    python benchmarks/bench_network.py --device cuda --dtype bf16 --json out.json

Speed and memory goals live here, not in tests (see the README's performance section).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Dict, List, Optional

NETWORKS = ("smit", "smit_light", "swinunetr", "plainconvunet")  # the default run
# SMITNet by benchmark name: (decoder, encoder gradient checkpointing)
SMIT_NETWORKS = {"smit": ("smit", False), "smit_light": ("light", True),
                 "smit_light_no_checkpointing": ("light", False)}
NUM_CLASSES = 14
# Peak dense bf16 matrix throughput of cards we may meet, for the "% of peak" figure; the first key found in the
# device name counts, so variants come before their family (the SXM parts).
GPU_PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H200 NVL": 835.0, "H100": 989.0, "H200": 989.0,
                        "A100": 312.0}


def build(name: str, patch: int, preset: str):
    from torch import nn

    if name in SMIT_NETWORKS:
        from nnunet_smit.architectures import SMITConfig, SMITNet

        decoder, checkpointing = SMIT_NETWORKS[name]
        return SMITNet(SMITConfig.preset(preset), 1, NUM_CLASSES, deep_supervision=True, decoder=decoder,
                       gradient_checkpointing=checkpointing)
    if name == "swinunetr":
        from monai.networks.nets import SwinUNETR

        return SwinUNETR(in_channels=1, out_channels=NUM_CLASSES, feature_size=48, use_checkpoint=False)
    if name == "plainconvunet":
        from dynamic_network_architectures.architectures.unet import PlainConvUNet
        from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

        # nnU-Net's default 3d_fullres topology for an isotropic patch of this size.
        _, strides, kernels, _, _ = get_pool_and_conv_props([1.0] * 3, [patch] * 3, 4, 999999)
        n_stages = len(strides)
        return PlainConvUNet(
            1, n_stages, [min(32 * 2**i, 320) for i in range(n_stages)], nn.Conv3d, kernels, strides,
            [2] * n_stages, NUM_CLASSES, [2] * (n_stages - 1), conv_bias=True, norm_op=nn.InstanceNorm3d,
            norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
            deep_supervision=True,
        )
    raise ValueError(name)


def _loss(out):
    outs = out if isinstance(out, (list, tuple)) else [out]
    return sum(o.float().mean() for o in outs)


def run_case(name: str, patch: int, device: str, dtype: str, repeats: int, preset: str,
             threads: Optional[int] = None) -> Dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    net = build(name, patch, preset).to(dev).train()
    x = torch.randn(2 if device == "cuda" else 1, 1, patch, patch, patch, device=dev)
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def forward():
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            return net(x)

    def step():
        net.zero_grad(set_to_none=True)
        _loss(forward()).backward()

    # Time and memory first: FLOP counting runs every operator through a dispatch mode whose step can set the
    # process' peak (the light network's checkpointed encoder, by about 130 MB at 96^3), and it is not training.
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timings = {}
    for label, fn in (("forward", lambda: forward()), ("forward_backward", step)):
        with torch.set_grad_enabled(label == "forward_backward"):
            fn()  # warm-up (and cudnn autotune)
            sync()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - start)
        timings[label] = min(times)
    if dev.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss is in KiB on Linux: the process' peak over the forward and training steps
        peak_mb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, rss_before) / 1024

    with FlopCounterMode(display=False) as counter:
        step()
    flops_fwd_bwd = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        forward()
    flops_fwd = counter.get_total_flops()
    return {
        "network": name,
        "patch": patch,
        "batch": int(x.shape[0]),
        "params_m": sum(p.numel() for p in net.parameters()) / 1e6,
        "forward_s": timings["forward"],
        "forward_backward_s": timings["forward_backward"],
        "peak_memory_mb": peak_mb,
        "gflops_forward": flops_fwd / 1e9,
        "gflops_forward_backward": flops_fwd_bwd / 1e9,
        "achieved_tflops_forward_backward": flops_fwd_bwd / timings["forward_backward"] / 1e12,
    }


def describe_machine(device: str, threads: Optional[int] = None) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{threads or torch.get_num_threads()} torch threads, torch {torch.__version__}")


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, nargs="+", default=[96, 128])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                        help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--preset", default="smit_small")
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(SMIT_NETWORKS) + [n for n in NETWORKS if n not in SMIT_NETWORKS])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads per case (default: torch's). On a CPU shared with other jobs, 1 "
                        "keeps the ratios fair: the encoder's many small operators wait at every multi-thread "
                        "barrier when another job holds a core, large convolutions much less")
    parser.add_argument("--json", help="write all figures to this file")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: NAME:PATCH, one case in this process
    args = parser.parse_args(argv)
    dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")

    if args.case:
        name, patch = args.case.split(":")
        print(json.dumps(run_case(name, int(patch), args.device, dtype, args.repeats, args.preset, args.threads)))
        return 0

    results = []
    for patch in args.patches:
        for name in args.networks:
            cmd = [sys.executable, os.path.abspath(__file__), "--case", f"{name}:{patch}", "--device", args.device,
                   "--dtype", dtype, "--repeats", str(args.repeats), "--preset", args.preset]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{name} @ {patch}^3 failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"{name:27s} {patch:4d}^3  fwd {r['forward_s']:8.3f} s  fwd+bwd {r['forward_backward_s']:8.3f} s  "
                  f"peak {r['peak_memory_mb']:9.0f} MB  {r['gflops_forward_backward']:9.1f} GFLOP  "
                  f"{r['achieved_tflops_forward_backward'] * 1e3:8.1f} GFLOP/s", flush=True)

    machine = describe_machine(args.device, args.threads)
    print(f"\nmachine: {machine}; dtype {dtype}; best of {args.repeats}")
    ratios = []
    for patch in args.patches:
        by = {r["network"]: r for r in results if r["patch"] == patch}
        for network in (n for n in SMIT_NETWORKS if n in by):
            smit = by[network]
            row = {"network": network, "patch": patch}
            for baseline in ("swinunetr", "plainconvunet"):
                if baseline in by:
                    base = by[baseline]
                    row[f"time_vs_{baseline}"] = smit["forward_backward_s"] / base["forward_backward_s"]
                    row[f"memory_vs_{baseline}"] = smit["peak_memory_mb"] / base["peak_memory_mb"]
                    row[f"flops_vs_{baseline}"] = smit["gflops_forward_backward"] / base["gflops_forward_backward"]
            if "plainconvunet" in by:
                row["flop_rate_vs_plainconvunet"] = (
                    smit["achieved_tflops_forward_backward"] / by["plainconvunet"]["achieved_tflops_forward_backward"]
                )
            if args.device == "cuda":
                name = describe_machine("cuda")
                peak = next((v for k, v in GPU_PEAK_BF16_TFLOPS.items() if k in name), None)
                if peak:
                    row["smit_fraction_of_bf16_peak"] = smit["achieved_tflops_forward_backward"] / peak
            ratios.append(row)
            print(f"{network} {patch}^3: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if k not in ("network", "patch")))
    print("goals: smit: time_vs_swinunetr <= 0.70, flop_rate_vs_plainconvunet >= 1.00, on GPU bf16 >= 35% of peak; "
          "smit_light: time_vs_plainconvunet <= 1.00, time_vs_swinunetr <= 0.50, memory_vs_plainconvunet <= 1.00")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "dtype": dtype, "results": results, "ratios": ratios}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
