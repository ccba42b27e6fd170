"""Installing pixart-cli makes torchvision (and what imports it) importable for any code in the environment."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PTH = "pixart_cli_torchvision.pth"
HOOK = "_pixart_torchvision_hook"


def python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """``code`` in a new interpreter of this environment, away from the source tree (nothing imports pixart_cli)."""
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_interpreter_start_imports_nothing_heavy(tmp_path):
    done = python(
        "import sys; print(sorted(m for m in ('torch', 'torchvision', 'pixart_cli') if m in sys.modules))", tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_torchvision_and_hub_libraries_import_without_pixart_cli(tmp_path):
    """torch 2.13 (CPU) beside torchvision 0.28 (CUDA build): the installed .pth applies the fix for any code."""
    code = (
        "import sys\n"
        "import diffusers.pipelines\n"
        "import torchvision\n"
        "from transformers import T5EncoderModel\n"
        "from diffusers import PixArtTransformer2DModel\n"
        "from torchvision.models import inception_v3\n"
        "print('ok')\n"
    )
    done = python(code, tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (
        f"{done.stderr[-2000:]}\n(is this environment's install older than {PTH}? rerun `pip install -e .`)"
    )


def _copy_source(dst: Path) -> Path:
    """What a build reads, copied, so that building leaves no build/ in the source tree."""
    for name in ("pyproject.toml", "setup.py", "README.md", f"{HOOK}.py"):
        shutil.copy2(ROOT / name, dst / name)
    shutil.copytree(ROOT / "pixart_cli", dst / "pixart_cli", ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _root_entries(wheel: Path) -> dict[str, bytes]:
    """Files at the wheel's root (they install into site-packages itself), checked against its RECORD."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        recorded = {row[0] for row in csv.reader(io.StringIO(archive.read(record).decode()))}
        root = {n: archive.read(n) for n in names if "/" not in n}
    assert set(root) <= recorded  # in RECORD: `pip uninstall pixart-cli` removes them
    return root


def test_both_wheels_install_the_pth_at_the_root(tmp_path):
    """`pip install .` and `pip install -e .` both put the .pth in site-packages, and record it for uninstalling."""
    (tmp_path / "src").mkdir()
    source = _copy_source(tmp_path / "src")
    out = tmp_path / "dist"
    code = (
        "from setuptools import build_meta as b\n"
        f"print('built', b.build_wheel({str(out)!r}), b.build_editable({str(out)!r}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    regular, editable = (out / name for name in done.stdout.splitlines()[-1].split()[1:])
    line = f"import {HOOK}; {HOOK}.install()\n".encode()
    assert _root_entries(regular)[PTH] == line
    assert f"{HOOK}.py" in _root_entries(regular)
    assert _root_entries(editable)[PTH] == line  # the hook module itself comes through setuptools' editable finder


@pytest.mark.parametrize("first", ["torchvision", "pixart_cli"])
def test_hook_applies_the_fix_once_and_steps_aside(tmp_path, first):
    """Whichever comes first, torchvision imports; the hook has left sys.meta_path afterwards."""
    code = (
        f"import sys, {HOOK}\n"
        f"{HOOK}.install(); {HOOK}.install()\n"
        f"assert sys.meta_path.count({HOOK}.TorchvisionHook) == 1\n"
        f"import {first}\n"
        "import torchvision.transforms\n"
        f"assert {HOOK}.TorchvisionHook not in sys.meta_path\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )  # cwd: the hook module from the source tree, whatever is installed
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
