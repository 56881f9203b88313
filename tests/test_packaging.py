"""Packaging: the wheel installs the three folders under the `lowbit` namespace; --help stays light."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

from tests.conftest import ROOT


def test_wheel_builds_and_imports_from_its_own_files(tmp_path):
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("lowbit-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert (
        "lowbit/trainer/loop.py" in names
        and "lowbit/losses/objective.py" in names
        and "lowbit/quant/__init__.py" in names
    )
    assert not any(name.startswith(("trainer/", "losses/", "quant/", "tests/")) for name in names)
    assert any(name.endswith("entry_points.txt") for name in names)
    target = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr
    probe = (
        "import lowbit.trainer.cli, lowbit.losses, lowbit.quant, lowbit.trainer.loop;"
        "print(lowbit.trainer.cli.__file__); print(lowbit.losses.__file__)"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    shown = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert shown.returncode == 0, shown.stderr
    assert all(line.startswith(str(target)) for line in shown.stdout.split()), shown.stdout


def test_help_does_not_import_heavy_packages():
    probe = (
        "import sys\nfrom lowbit.trainer.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'wandb', 'deepspeed', 'bitsandbytes', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), "lowbit")
    done = subprocess.run([script, "train", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--nproc-per-node" in done.stdout
