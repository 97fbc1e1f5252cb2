"""Registration with nnU-Net: the nnUNet_extTrainer value, the start-up hook in both wheels, and the lookup."""
import os
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from nnunet_smit import registration

REPO = Path(__file__).resolve().parents[2]
PTH = "nnunet_smit_trainers.pth"


def test_appends_to_user_value_and_keeps_it_first():
    value = registration.extend_search_path(os.pathsep.join(["/a", "/b"]), "/shim")
    assert value.split(os.pathsep) == ["/a", "/b", "/shim"]


def test_no_duplicates_and_empty_entries_dropped():
    once = registration.extend_search_path(None, "/shim")
    assert once == "/shim"
    assert registration.extend_search_path(once, "/shim") == "/shim"
    assert registration.extend_search_path("/shim/" + os.pathsep + os.pathsep, "/shim") == "/shim/"


def test_register_updates_the_given_environment():
    env = {"nnUNet_extTrainer": "/mine"}
    registration.register(env)
    folder = registration.trainer_shim_folder()
    assert env["nnUNet_extTrainer"].split(os.pathsep) == ["/mine", folder]
    assert (Path(folder) / "nnunet_smit_trainer_classes.py").is_file()


def test_shim_folder_is_not_a_package_and_reexports_all_trainers():
    folder = Path(registration.trainer_shim_folder())
    assert not (folder / "__init__.py").exists()  # nnU-Net imports its modules as top-level names
    text = (folder / "nnunet_smit_trainer_classes.py").read_text()
    assert "from nnunet_smit.trainers import" in text


def test_fallback_command_prints_the_folder():
    out = subprocess.run([sys.executable, "-m", "nnunet_smit.registration"], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout.strip()
    assert out == registration.trainer_shim_folder()


def _build(kind: str, out_dir: Path) -> Path:
    """Build a wheel (``kind`` "wheel") or a PEP 660 editable wheel through setuptools' build backend."""
    code = (
        "import sys, setuptools.build_meta as b; "
        f"print(b.build_{kind}(sys.argv[1]))"
    )
    name = subprocess.run([sys.executable, "-c", code, str(out_dir)], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip().splitlines()[-1]
    return out_dir / name


@pytest.mark.parametrize("kind", ["wheel", "editable"])
def test_both_wheels_carry_the_startup_hook_at_the_root(kind, tmp_path):
    wheel = _build(kind, tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert PTH in names
        assert zf.read(PTH) == (REPO / PTH).read_bytes()
        if kind == "wheel":
            assert "nnunet_smit/nnunet_trainer_shim/nnunet_smit_trainer_classes.py" in names
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        assert PTH in zf.read(record).decode()  # so pip uninstall removes it


def _installed() -> bool:
    try:
        metadata.distribution("nnunet_smit")
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _installed(), reason="nnunet_smit is not pip-installed here")
def test_installed_hook_makes_nnunet_find_the_trainer_without_the_variable():
    purelib = Path(sysconfig.get_paths()["purelib"])
    assert (purelib / PTH).is_file(), f"the start-up hook is missing from {purelib}"
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    code = (
        "import os; print(os.environ['nnUNet_extTrainer']); "
        "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f; "
        "print(f('nnUNetTrainerSMIT').__module__); print(f('nnUNetTrainer').__module__)"
    )
    lines = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                           cwd="/").stdout.strip().splitlines()
    assert lines[0] == registration.trainer_shim_folder()
    assert lines[-2] == "nnunet_smit.trainers.nnUNetTrainerSMIT"
    assert lines[-1] == "nnunetv2.training.nnUNetTrainer.nnUNetTrainer"


@pytest.mark.skipif(not _installed(), reason="nnunet_smit is not pip-installed here")
def test_user_value_is_kept_in_child_processes(tmp_path):
    env = {**os.environ, "nnUNet_extTrainer": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", "import os; print(os.environ['nnUNet_extTrainer'])"], env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out.split(os.pathsep) == [str(tmp_path), registration.trainer_shim_folder()]
