#!/usr/bin/env python3
"""Set up trainyard in ./.venv on a machine that has only Python.

Installs torch first, so that a machine without an NVIDIA GPU gets the CPU build (never a
multi-GB CUDA download) and a GPU machine gets the regular CUDA build; then trainyard
itself (editable, with its built-in plugins and test extras), and the example
third-party plugin in examples/trainyard-example-plugin (editable).

    python3 .ci/bootstrap.py            # idempotent: re-running only checks
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
TORCH = "torch==2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def run(*cmd: str, check: bool = True) -> int:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=check).returncode


def has_nvidia_gpu() -> bool:
    if os.environ.get("TRAINYARD_CPU_ONLY"):
        return False
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    return subprocess.run([smi, "-L"], capture_output=True).returncode == 0


def main() -> int:
    python = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if not python.exists():
        print(f"creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    py = str(python)
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    have_torch = subprocess.run([py, "-c", "import torch"], capture_output=True).returncode == 0
    if not have_torch:
        if has_nvidia_gpu():
            run(*pip, TORCH)
        # The CPU build: from a local wheel folder when pip has one configured
        # (PIP_FIND_LINKS), its dependencies from the usual index; else from
        # PyTorch's CPU index.
        elif run(*pip, "--no-index", "--no-deps", TORCH, check=False) == 0:
            run(*pip, TORCH)
        else:
            run(*pip, TORCH, "--index-url", CPU_INDEX, "--extra-index-url", "https://pypi.org/simple")
    run(*pip, "-e", f"{ROOT}[test]")
    # The example third-party plugin, as its own distribution: the tests check that it is
    # found through its entry point. After trainyard, so its dependency is already met.
    run(*pip, "-e", str(ROOT / "examples" / "trainyard-example-plugin"))
    install_browser()
    print(f"ready: {VENV}/bin/trainyard", flush=True)
    return 0


#: The headless browser the report's test opens the report in (tests/test_report.py).
BROWSER = "/usr/bin/chromium"


def install_browser() -> None:
    """Debian's chromium, for the report's browser test, where it is missing and apt can
    install it (as root, or through sudo); otherwise say how, and go on."""
    if os.path.exists(BROWSER) or not shutil.which("apt-get"):
        if not os.path.exists(BROWSER):
            print(f"note: {BROWSER} is missing: the report's browser test needs Debian's chromium",
                  flush=True)
        return
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in ([*sudo, "apt-get", "update", "-q"], [*sudo, "apt-get", "install", "-y", "-q", "chromium"]):
        print("+", " ".join(cmd), flush=True)
        if subprocess.run(cmd, env=env).returncode != 0:
            print(f"note: could not install chromium; the report's browser test needs {BROWSER}", flush=True)
            return


if __name__ == "__main__":
    sys.exit(main())
