"""smit_pretrain end to end: export and last output line, clear errors, and a 2-process DDP run (gloo)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nnunet_smit.pretraining.cli import (DEMO_CASES, DEMO_SETTINGS, DEMO_SPACING_MM, build_parser, config_from_args,
                                         main, preprocessing_from_args)
from tests.pretraining.training_support import phantom_dirs

REPO = Path(__file__).resolve().parents[2]
TINY_ARGS = [
    "--preset", "tiny", "--view_size", "64", "--region_size", "80", "--batch_size", "1", "--samples_per_epoch", "4",
    "--epochs", "5", "--head_hidden_dim", "64", "--head_bottleneck_dim", "32", "--head_out_dim", "128",
    "--num_workers", "0", "--device", "cpu", "--no_progress", "--preview_every_epochs", "1",
]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def _torchrun(data: Path, cache: Path, out: Path, *options: str) -> list:
    """smit_pretrain under torchrun with 2 processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "nnunet_smit.pretraining.cli", "-d", str(data), "-o", str(out), "--cache_dir", str(cache),
            *options, *TINY_ARGS]


def _wait_for_train_records(process: subprocess.Popen, log: Path, count: int) -> None:
    """Wait until ``log`` holds ``count`` training records, with the process still running."""
    import time

    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if log.is_file() and sum('"event": "train"' in line for line in log.read_text().splitlines()) >= count:
            break
        time.sleep(0.5)
    assert process.poll() is None, "".join(s for s in process.communicate() if s)[-3000:]


def test_max_steps_exports_and_prints_the_path_last(tmp_path_factory, tmp_path):
    data, cache = phantom_dirs(tmp_path_factory)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "nnunet_smit.pretraining.cli", "-d", str(data), "-o", str(out),
               "--cache_dir", str(cache), "--max_steps", "4", *TINY_ARGS]
    result = subprocess.run(command, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    last_line = result.stdout.strip().splitlines()[-1]
    assert last_line == str(out / "smit_encoder_teacher.pt") and Path(last_line).is_file()
    # One epoch is 4 steps: the loss curves and the first epoch's reconstruction preview exist.
    assert (out / "plots" / "loss_curves.png").is_file()
    assert (out / "plots" / "reconstruction_epoch0001.png").is_file()
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 4 and summary["finished"] is False


HOLD_RUN_FOLDER = """
import sys, time
from nnunet_smit.files import FolderLock
FolderLock(sys.argv[1], "the run folder").acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_run_on_a_folder_in_use_is_refused_at_once_naming_the_holder(tmp_path_factory, tmp_path, capsys,
                                                                            caplog):
    import socket

    from nnunet_smit.pretraining.engine import RUN_LOCK_NAME

    data, cache = phantom_dirs(tmp_path_factory)
    out = tmp_path / "run"
    # The first run, as far as the folder can tell: a live process holding its lock.
    holder = subprocess.Popen([sys.executable, "-c", HOLD_RUN_FOLDER, str(out / RUN_LOCK_NAME)],
                              stdout=subprocess.PIPE, text=True, env=_env())
    assert holder.stdout.readline().strip() == "held"
    try:
        code = main(["-d", str(data), "-o", str(out), "--cache_dir", str(cache), "--cache_only", *TINY_ARGS])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"error: the run folder {out} is in use by pid {holder.pid} on host "
                              f"{socket.gethostname()}, since ")
        assert "wait for that run to end" in err and "choose another output folder (-o)" in err
    finally:
        holder.kill()
        holder.wait()
    # Killed (SIGKILL): the lock died with it, and the next run takes over with a warning, and removes what the killed
    # run was writing.
    (out / ".checkpoint_latest.pt.k2j3h4.tmp").write_bytes(b"half a checkpoint")
    (out / "plots").mkdir()
    (out / "plots" / ".loss_curves.png.a8d7f1.tmp").write_bytes(b"half a figure")
    with caplog.at_level("WARNING", logger="nnunet_smit.pretraining"):
        code = main(["-d", str(data), "-o", str(out), "--cache_dir", str(cache), "--cache_only", *TINY_ARGS])
    assert code == 0
    assert f"was last held by pid {holder.pid}" in caplog.text and "this run takes over" in caplog.text
    assert (out / RUN_LOCK_NAME).read_text() == ""  # released at the end
    assert not [p for p in out.rglob("*.tmp") if "cache" not in p.parts]


def test_centering_option_reaches_the_config():
    parser = build_parser()
    assert config_from_args(parser.parse_args(["-o", "x", "--centering", "sinkhorn_knopp"])).centering == "sinkhorn_knopp"
    assert config_from_args(parser.parse_args(["-o", "x", "--centering", "center"])).centering == "center"
    with pytest.raises(SystemExit):
        parser.parse_args(["-o", "x", "--centering", "mean"])


def test_drop_path_rate_overrides_the_presets_student_and_is_checked():
    from nnunet_smit.errors import SMITError

    parser = build_parser()
    assert config_from_args(parser.parse_args(["-o", "x", "--preset", "smit_small"])).encoder_config().drop_path_rate == 0.3
    config = config_from_args(parser.parse_args(["-o", "x", "--preset", "smit_small", "--drop_path_rate", "0"]))
    assert config.encoder_config().drop_path_rate == 0.0 and config.encoder_overrides == {"drop_path_rate": 0.0}
    with pytest.raises(SMITError, match="drop_path_rate must be in"):
        config_from_args(parser.parse_args(["-o", "x", "--drop_path_rate", "1.5"]))


def test_demo_settings_make_a_valid_run_at_the_demo_spacing_and_explicit_options_override_them():
    parser = build_parser()
    demo = parser.parse_args(["-o", "x", "--demo"])
    config = config_from_args(demo)
    assert {name: getattr(config, name) for name in DEMO_SETTINGS} == DEMO_SETTINGS
    assert preprocessing_from_args(demo).target_spacing_mm == DEMO_SPACING_MM == (3.0, 3.0, 3.0)
    explicit = parser.parse_args(["-o", "x", "--demo", "--spacing", "2", "2", "2", "--base_lr", "1e-5"])
    assert preprocessing_from_args(explicit).target_spacing_mm == (2.0, 2.0, 2.0)
    assert config_from_args(explicit).base_lr == 1e-5
    assert preprocessing_from_args(parser.parse_args(["-o", "x"])).target_spacing_mm == (2.0, 2.0, 2.0)


def test_every_demo_phantom_holds_a_demo_view_at_the_demo_spacing():
    # The cache skips scans smaller than the view: a demo whose phantoms were skipped would have nothing to learn.
    import numpy as np

    from nnunet_smit.pretraining.cache import preprocess_ct
    from nnunet_smit.pretraining.phantoms import DEMO_PHANTOM, generate_phantom_volume

    preprocessing = preprocessing_from_args(build_parser().parse_args(["-o", "x", "--demo"]))
    for case in range(DEMO_CASES):  # generate_phantom_corpus's cases, seed 0
        hu, spacing = generate_phantom_volume(np.random.default_rng([0, case]), **DEMO_PHANTOM)
        array, _ = preprocess_ct(hu, spacing, preprocessing)
        assert min(array.shape) >= DEMO_SETTINGS["view_size"], (case, array.shape)


def test_missing_input_folder_is_a_one_line_error(tmp_path, capsys):
    code = main(["-d", str(tmp_path / "nowhere"), "-o", str(tmp_path / "out"), *TINY_ARGS])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert "Traceback" not in captured.err and captured.out == ""


def test_negative_loss_weight_is_a_one_line_error(tmp_path, capsys):
    code = main(["-d", str(tmp_path), "-o", str(tmp_path / "out"), "--weight_koleo", "-0.1"])
    captured = capsys.readouterr()
    assert code == 2 and captured.err == "error: weight_koleo must be 0 (off) or positive, got -0.1.\n"


@pytest.mark.parametrize("option, message", [
    (["--preset", "smit_tiny"], "Unknown SMIT preset 'smit_tiny'"),
    (["--base_lr=-1e-4"], "base_lr must be positive, got -0.0001."),
    (["--base_lr", "nan"], "base_lr must be positive, got nan."),
    (["--teacher_temp_end", "0"], "teacher_temp_end must be positive, got 0.0."),
    (["--momentum_teacher", "1.5"], "momentum_teacher must be in [0, 1], got 1.5."),
    (["--intensity_jitter", "1.5"], "intensity_jitter must be in [0, 1), got 1.5."),
    (["--head_out_dim", "0"], "head_out_dim must be at least 1, got 0."),
    (["--num_workers", "-1"], "num_workers must be 0 or more (or unset: automatic), got -1."),
    (["--max_steps", "0"], "max_steps must be at least 1 (or unset), got 0."),
    (["--mask_cube_size", "24"], "is not a multiple of the 24-voxel mask cube"),
    (["--no_dino", "--no_ibot", "--no_reconstruction"], "All pretraining objectives are switched off"),
    (["--region_size", "48"], "region size (48, 48, 48) must be at least the view size (64, 64, 64) on every axis"),
    (["--mask_ratio", "0"], "mask ratio 0.0 masks no 16^3 cube of a 64^3 view, so iBOT and reconstruction would"),
])
def test_bad_setting_is_a_one_line_error_before_any_scan_is_read(tmp_path, capsys, option, message):
    # The scans are never read (nor the output folder made): a typo costs no cache building.
    data = tmp_path / "scans"
    data.mkdir()
    (data / "broken.nii.gz").write_bytes(b"not a scan")
    code = main(["-d", str(data), "-o", str(tmp_path / "out"), *TINY_ARGS, *option])
    captured = capsys.readouterr()
    assert code == 2 and captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert message in captured.err
    assert not (tmp_path / "out").exists()


def test_init_encoder_that_cannot_start_the_run_is_a_one_line_error_before_any_scan_is_read(tmp_path, capsys):
    from nnunet_smit.architectures import SMITConfig
    from nnunet_smit.architectures.swin_encoder import SwinEncoder
    from nnunet_smit.checkpoint import save_encoder_checkpoint
    from nnunet_smit.conventions import PretrainPreprocessing

    data = tmp_path / "scans"
    data.mkdir()
    (data / "broken.nii.gz").write_bytes(b"not a scan")
    small = SMITConfig.preset("smit_small")
    save_encoder_checkpoint(tmp_path / "small.pt", SwinEncoder(small).state_dict(), small, PretrainPreprocessing())
    for weights, message in ((tmp_path / "small.pt", "holds another encoder than the run's preset 'tiny' (embed_dim "
                                                     "48 instead of 12; depths [2, 2, 4, 2] instead of [2, 2, 2, 2]"),
                             (tmp_path / "nowhere.pt", "nowhere.pt does not exist")):
        code = main(["-d", str(data), "-o", str(tmp_path / "out"), *TINY_ARGS, "--init_encoder", str(weights)])
        captured = capsys.readouterr()
        assert code == 2 and captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
        assert message in captured.err
        assert not (tmp_path / "out").exists()
        assert captured.err.endswith(": pass --preset smit_small.\n") == (weights.name == "small.pt")


def test_folder_without_scans_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no scans here")
    code = main(["-d", str(tmp_path / "empty"), "-o", str(tmp_path / "out"), *TINY_ARGS])
    captured = capsys.readouterr()
    assert code == 2 and captured.err.startswith("error: ") and "Traceback" not in captured.err


def test_an_interrupted_cache_build_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    from nnunet_smit.pretraining import engine
    from nnunet_smit.pretraining.cache import CacheBuildInterrupted

    def interrupted(*args, **kwargs):
        raise CacheBuildInterrupted("cache build interrupted: 3 of the 9 scans are preprocessed in X; rerun ...")

    monkeypatch.setattr(engine, "build_cache", interrupted)  # what the cache's SIGINT/SIGTERM handling raises
    code = main(["-d", str(tmp_path), "-o", str(tmp_path / "out"), *TINY_ARGS])
    captured = capsys.readouterr()
    assert code == 130 and captured.err.startswith("cache build interrupted: 3 of the 9")
    assert "Traceback" not in captured.err
    assert captured.err.count("\n") == 1 and captured.out == ""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed support")
def test_two_process_ddp_run_agrees_on_the_weights(tmp_path_factory, tmp_path):
    # Sinkhorn-Knopp centering all-reduces its sums and the masked-token count across the processes.
    data, cache = phantom_dirs(tmp_path_factory)
    out = tmp_path / "ddp"
    command = _torchrun(data, cache, out, "--max_steps", "2", "--centering", "sinkhorn_knopp")
    result = subprocess.run(command, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 2 and summary["steps"] == 2
    per_rank = summary["weights_checksums_per_rank"]
    assert len(per_rank) == 2 and per_rank[0] == per_rank[1]
    assert (out / "smit_encoder_teacher.pt").is_file()
    assert json.loads((out / "pretrain_config.json").read_text())["pretrain_config"]["centering"] == "sinkhorn_knopp"
    # Rank 0 alone wrote the log; the world size reached the log records.
    starts = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["world_size"] for r in starts if r["event"] == "start"] == [2]


def test_sigterm_to_the_whole_process_group_saves_and_stops_cleanly(tmp_path_factory, tmp_path):
    # What a scheduler's pre-emption does: SIGTERM to every process of the job, loader workers included.
    import signal

    data, cache = phantom_dirs(tmp_path_factory)
    out = tmp_path / "preempted"
    args = [arg if arg != "0" or prev != "--num_workers" else "2" for prev, arg in zip([""] + TINY_ARGS, TINY_ARGS)]
    command = [sys.executable, "-m", "nnunet_smit.pretraining.cli", "-d", str(data), "-o", str(out),
               "--cache_dir", str(cache), "--max_steps", "500", "--log_every_steps", "1", *args]
    process = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    _wait_for_train_records(process, out / "log.jsonl", 3)
    os.killpg(process.pid, signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("pretraining interrupted (SIGTERM) at step ") and "Traceback" not in stderr
    step = int(last.split("at step ")[1].split(";")[0])
    assert torch.load(out / "checkpoint_latest.pt", map_location="cpu", weights_only=True)["step"] == step
    with pytest.raises(ProcessLookupError):  # no loader worker left behind
        os.killpg(process.pid, 0)


def _rank_pids(launcher_pid: int) -> dict:
    """{rank: pid} of the processes a torchrun launcher started (their RANK environment variable)."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) != launcher_pid:  # the parent process id
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                ranks[int(item[5:])] = int(entry.name)
    return ranks


@pytest.mark.skipif(not (torch.distributed.is_available() and Path("/proc/self/environ").exists()),
                    reason="torch without distributed support, or no /proc to find the ranks in")
def test_ddp_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path_factory, tmp_path):
    # Pre-emption may reach one process first: every rank must save together and stop at the same step.
    import signal

    data, cache = phantom_dirs(tmp_path_factory)
    out = tmp_path / "ddp_stop"
    command = _torchrun(data, cache, out, "--max_steps", "500", "--log_every_steps", "1")
    process = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    _wait_for_train_records(process, out / "log.jsonl", 3)
    ranks = _rank_pids(process.pid)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    stops = [line for line in output.splitlines() if line.startswith("pretraining interrupted (")]
    assert len(stops) == 2 and "Traceback" not in "".join(stops), output[-3000:]
    steps = {int(line.split("at step ")[1].split(";")[0]) for line in stops}
    assert len(steps) == 1, stops
    step = steps.pop()
    assert any(line.startswith("pretraining interrupted (SIGTERM)") for line in stops)
    assert any(line.startswith("pretraining interrupted (signal on another process)") for line in stops)
    assert torch.load(out / "checkpoint_latest.pt", map_location="cpu", weights_only=True)["step"] == step


@pytest.mark.parametrize("demo", [False, True])
def test_an_output_folder_that_cannot_be_made_is_a_one_line_error(tmp_path, capsys, demo):
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "a_file").write_text("not a folder")
    out = tmp_path / "a_file" / "run"
    code = main(["--demo" if demo else "-d", *([] if demo else [str(data)]), "-o", str(out), *TINY_ARGS])
    captured = capsys.readouterr()
    assert code == 2 and captured.err.startswith(f"error: {out}") and "Traceback" not in captured.err
    assert ": Not a directory; check the path, its permissions and the free space." in captured.err
    assert captured.err.count("\n") == 1
