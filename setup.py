"""Packaging for nnunet_smit."""
import re
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "nnunet_smit" / "__init__.py").read_text()).group(1)

# Start-up hook that registers the SMIT trainers with nnU-Net (see nnunet_smit/registration.py). It must sit at
# the site-packages root, so both the wheel and the editable install add it there; pip uninstall removes it.
# Its name sorts after setuptools' "__editable__*.pth", so the package is importable when it runs.
STARTUP_PTH = "nnunet_smit_trainers.pth"


class BuildPyWithStartupPth(build_py):
    """build_py that also copies the start-up .pth to the root of build_lib (and so of the wheel)."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            self.copy_file(str(HERE / STARTUP_PTH), str(Path(self.build_lib) / STARTUP_PTH))

    def get_outputs(self, include_bytecode: bool = True):
        outputs = list(super().get_outputs(include_bytecode))
        if not self.editable_mode:
            outputs.append(str(Path(self.build_lib) / STARTUP_PTH))
        return outputs


class _StrategyWithStartupPth:
    """Wraps setuptools' editable strategy: writes the editable wheel as usual, plus the start-up .pth."""

    def __init__(self, strategy) -> None:
        self._strategy = strategy

    def __call__(self, wheel, files, mapping) -> None:
        self._strategy(wheel, files, mapping)
        wheel.writestr(STARTUP_PTH, (HERE / STARTUP_PTH).read_bytes())

    def __enter__(self):
        self._strategy.__enter__()
        return self

    def __exit__(self, *exc_info):
        return self._strategy.__exit__(*exc_info)


class EditableWheelWithStartupPth(editable_wheel):
    """PEP 660 editable wheel that carries the start-up .pth (setuptools leaves build_lib extras out).

    Extends setuptools' private ``_select_strategy`` (present from 64 to at least 84);
    tests/trainers/test_registration.py builds both wheels and checks that the .pth is inside.
    """

    def _select_strategy(self, name, tag, build_lib):
        return _StrategyWithStartupPth(super()._select_strategy(name, tag, build_lib))


setup(
    name="nnunet_smit",
    version=VERSION,
    description="SMIT self-supervised Swin-3D pretraining on CT and fine-tuning inside nnU-Net v2",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["nnunet_smit", "nnunet_smit.*"]),
    include_package_data=True,
    # The trainer shim folder is not a package (nnU-Net imports its module as a top-level name).
    package_data={"nnunet_smit": ["nnunet_trainer_shim/*.py"]},
    cmdclass={"build_py": BuildPyWithStartupPth, "editable_wheel": EditableWheelWithStartupPth},
    install_requires=[
        "nnunetv2>=2.8.1,<2.9",
        # No exact pin: pip picks a torch/torchvision pair that match (nnU-Net's trainer lookup imports
        # torchvision through timm and breaks on a mismatched pair).
        "torch>=2.1",
        "torchvision",
        "dynamic-network-architectures>=0.4",
        "batchgenerators>=0.25",
        "batchgeneratorsv2>=0.3",
        "SimpleITK>=2.2",
        "nibabel",  # the values a NIfTI file stores (SimpleITK reads NaN as 0); nnU-Net installs it too
        "einops>=0.6",
        "safetensors>=0.4",
        "numpy",
        "matplotlib",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-xdist>=3", "monai>=1.3", "tensorboard>=2.10"],
        "tensorboard": ["tensorboard>=2.10"],
    },
    entry_points={
        "console_scripts": [
            "smit_convert=nnunet_smit.convert_cli:main",
            "smit_pretrain=nnunet_smit.pretraining.cli:main",
            "smit_study=nnunet_smit.study.cli:main",
            "smit_probe=nnunet_smit.probe.cli:main",
            "smit_demo=nnunet_smit.demo:main",
            "smit_plan=nnunet_smit.trainers.smit_plans:main",
            "smit_trainer_path=nnunet_smit.registration:main",
        ],
    },
)
