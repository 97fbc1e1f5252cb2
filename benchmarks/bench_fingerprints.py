"""What scan fingerprints cost: checkpoint size and load time with 10,000 of them, and hashing against reading.

1. Checkpoint: the same encoder saved without fingerprints and with ``--num_scans`` of them (fingerprint -> a
   cache-style case id), as torch and safetensors files; the added bytes, and ``load_encoder_checkpoint`` times
   (median of ``--repeats``) with and without.
2. Hashing: a CT-like int16 scan of ``--shape`` (z y x) written as .nii.gz and .nii; times to read it
   (``read_image_array``) and to fingerprint the array read (``fingerprint_array``, float32 conversion included),
   in MB/s of the scan's float32 size, and the ratio hash / read: what fingerprinting adds to reading a scan, which
   the cache does anyway. Plain sha256 over bytes already in memory is the floor.

    python benchmarks/bench_fingerprints.py                      # 10,000 fingerprints, a 512 x 512 x 300 scan
    python benchmarks/bench_fingerprints.py --json out.json
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np


def machine() -> Dict[str, str]:
    import SimpleITK as sitk
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpu_count": str(os.cpu_count()), "python": platform.python_version(),
            "numpy": np.__version__, "torch": torch.__version__, "simpleitk": sitk.Version.VersionString(),
            "date": datetime.date.today().isoformat()}


def timed(function: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``repeats`` calls, in seconds."""
    times: List[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def checkpoint_costs(folder: Path, num_scans: int, preset: str, repeats: int) -> Dict[str, Any]:
    from nnunet_smit.architectures import SMITConfig, SwinEncoder
    from nnunet_smit.checkpoint import load_encoder_checkpoint, save_encoder_checkpoint

    config = SMITConfig.preset(preset)
    state_dict = SwinEncoder(config).state_dict()
    rng = np.random.default_rng(0)
    scans = {f"{int(rng.integers(2**63)):016x}": f"scan_{i:05d}_0000_{int(rng.integers(2**32)):08x}"
             for i in range(num_scans)}
    results: Dict[str, Any] = {"preset": preset, "num_scans": num_scans}
    for suffix in (".pt", ".safetensors"):
        plain, fingerprinted = folder / f"plain{suffix}", folder / f"fingerprinted{suffix}"
        save_encoder_checkpoint(plain, state_dict, config)
        save_encoder_checkpoint(fingerprinted, state_dict, config, scan_fingerprints=scans)
        assert len(load_encoder_checkpoint(fingerprinted).pretraining_scans) == num_scans
        load_plain = timed(lambda: load_encoder_checkpoint(plain), repeats)
        load_fingerprinted = timed(lambda: load_encoder_checkpoint(fingerprinted), repeats)
        size_plain, size_fingerprinted = plain.stat().st_size, fingerprinted.stat().st_size
        results[suffix.lstrip(".")] = {
            "size_bytes": size_plain,
            "added_bytes": size_fingerprinted - size_plain,
            "added_bytes_per_scan": round((size_fingerprinted - size_plain) / num_scans, 1),
            "size_ratio": round(size_fingerprinted / size_plain, 4),
            "load_s": round(load_plain, 4),
            "added_load_s": round(load_fingerprinted - load_plain, 4),
            "load_ratio": round(load_fingerprinted / load_plain, 3),
        }
    return results


def hashing_costs(folder: Path, shape: List[int], repeats: int) -> Dict[str, Any]:
    import SimpleITK as sitk

    from nnunet_smit.fingerprints import fingerprint_array, read_image_array

    rng = np.random.default_rng(0)
    scan = np.full(shape, -1000, dtype=np.int16)  # air around a noisy body: compresses like a CT
    body = tuple(slice(n // 8, n - n // 8) for n in shape)
    scan[body] = rng.normal(40, 200, size=[s.stop - s.start for s in body]).astype(np.int16)
    megabytes = scan.size * 4 / 1e6  # float32 bytes hashed
    results: Dict[str, Any] = {"shape_zyx": list(shape), "float32_MB": round(megabytes, 1)}
    as_float32 = scan.astype(np.float32)
    hash_int16 = timed(lambda: fingerprint_array(scan), repeats)
    hash_float32 = timed(lambda: fingerprint_array(as_float32), repeats)
    sha256_floor = timed(lambda: hashlib.sha256(memoryview(as_float32.reshape(-1))).digest(), repeats)
    results["fingerprint_int16_MBps"] = round(megabytes / hash_int16, 1)
    results["fingerprint_float32_MBps"] = round(megabytes / hash_float32, 1)
    results["sha256_in_memory_MBps"] = round(megabytes / sha256_floor, 1)
    for suffix in (".nii.gz", ".nii"):
        path = folder / f"scan{suffix}"
        sitk.WriteImage(sitk.GetImageFromArray(scan), str(path), suffix.endswith(".gz"))
        read = timed(lambda: read_image_array(path), repeats)
        results[suffix.lstrip(".")] = {
            "file_MB": round(path.stat().st_size / 1e6, 1),
            "read_s": round(read, 3),
            "read_MBps": round(megabytes / read, 1),
            "fingerprint_s": round(hash_int16, 3),
            "fingerprint_over_read": round(hash_int16 / read, 3),
        }
        path.unlink()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_scans", type=int, default=10_000)
    parser.add_argument("--preset", default="smit_small", help="encoder whose checkpoint carries the fingerprints")
    parser.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512], help="scan shape (z y x) in voxels")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            "machine": machine(),
            "checkpoint": checkpoint_costs(Path(tmp), args.num_scans, args.preset, args.repeats),
            "hashing": hashing_costs(Path(tmp), args.shape, max(1, args.repeats // 2)),
        }
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
