"""Make nnU-Net find the SMIT trainers with no manual step.

nnU-Net 2.8 looks for trainers inside its own package and in the folders listed in the environment variable
``nnUNet_extTrainer`` (``os.pathsep``-separated). Installing nnunet_smit puts a start-up ``.pth`` hook in
site-packages that calls :func:`register` in every Python process: it appends the small shim folder
``nnunet_smit/nnunet_trainer_shim`` (one module re-exporting the trainer classes) to that variable, keeping any
value the user set. Child processes (DDP, nnU-Net's workers) inherit the variable and run the hook themselves.

This module is loaded by the hook before anything else of the package: it must import only the standard library.
For Pythons that skip ``.pth`` files (``python -S``, some embedded interpreters) the console command
``smit_trainer_path`` prints the folder, e.g. ``export nnUNet_extTrainer=$(smit_trainer_path)``.
"""
from __future__ import annotations

import argparse
import os
import shlex
from typing import MutableMapping, Optional, Sequence

ENV_VAR = "nnUNet_extTrainer"
SHIM_FOLDER_NAME = "nnunet_trainer_shim"


def trainer_shim_folder() -> str:
    """Absolute path of the folder that nnU-Net should search for the SMIT trainers."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), SHIM_FOLDER_NAME)


def _same_path(a: str, b: str) -> bool:
    return os.path.normcase(os.path.normpath(a)) == os.path.normcase(os.path.normpath(b))


def extend_search_path(current: Optional[str], folder: str) -> str:
    """``current`` (an ``os.pathsep`` list, or None) with ``folder`` appended unless already listed.

    The user's entries keep their order and come first, so a user's own trainer of the same name wins.
    """
    entries = [entry for entry in (current or "").split(os.pathsep) if entry.strip()]
    if not any(_same_path(entry, folder) for entry in entries):
        entries.append(folder)
    return os.pathsep.join(entries)


def register(environ: Optional[MutableMapping[str, str]] = None) -> str:
    """Append the shim folder to ``nnUNet_extTrainer`` in ``environ`` (default ``os.environ``); returns the value."""
    environ = os.environ if environ is None else environ
    folder = trainer_shim_folder()
    if not os.path.isdir(folder):  # a broken or partial install: leave the variable alone
        return environ.get(ENV_VAR, "")
    value = extend_search_path(environ.get(ENV_VAR), folder)
    environ[ENV_VAR] = value
    return value


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console command ``smit_trainer_path``: print the folder (or the full variable) for manual registration."""
    parser = argparse.ArgumentParser(
        prog="smit_trainer_path",
        description="Print the folder that holds the SMIT trainers for nnU-Net's nnUNet_extTrainer variable. "
        "Only needed where Python skips .pth start-up files; normally the install registers it.",
    )
    parser.add_argument(
        "--export",
        action="store_true",
        help="print a shell line 'export nnUNet_extTrainer=...' that keeps the current value",
    )
    args = parser.parse_args(argv)
    if args.export:
        value = extend_search_path(os.environ.get(ENV_VAR), trainer_shim_folder())
        print(f"export {ENV_VAR}={shlex.quote(value)}")
    else:
        print(trainer_shim_folder())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
