"""The Hugging Face Space: its front matter, requirements and binary files agree with each other."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The Space builds on Linux x86-64 (glibc). pip matches an explicit --platform literally, so list every manylinux tag.
SPACE_PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(28, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
LOCAL_PYTHON = "3.11"  # this project's CI machine


def front_matter() -> dict[str, str]:
    """The README's YAML block, top-level scalar keys only (enough for the checks here; no YAML library needed)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("---\n")[1]
    return {m[1]: m[2].strip().strip('"') for m in re.finditer(r"^(\w+):\s*(.*)$", block, re.M) if m[2].strip()}


def pins(path: Path) -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return dict(line.split("==", 1) for line in lines if "==" in line)


def test_front_matter_names_the_python_and_gradio_the_requirements_need():
    meta = front_matter()
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    assert meta["sdk_version"] == pins(ROOT / "requirements.txt")["gradio"]
    assert re.fullmatch(r"3\.1[1-3]", meta["python_version"]), "transformers 5 and numpy 2.4 need Python 3.11 or newer"
    assert meta["suggested_hardware"] == "cpu-basic"


def test_app_py_imports_spaces_before_anything_that_touches_torch():
    code = (ROOT / "app.py").read_text()
    imports = re.findall(r"^\s*(?:import|from)\s+([\w.]+)", code, re.M)
    assert imports[0] == "spaces", "on ZeroGPU the spaces package must patch torch before anything imports it"
    assert "spaces" in pins(ROOT / "requirements.txt")


def pypi_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/spaces/", timeout=15).close()
        return True
    except (urllib.error.URLError, OSError):
        return False


@pytest.mark.parametrize("python", sorted({front_matter()["python_version"], LOCAL_PYTHON}))
def test_requirements_resolve_to_binary_wheels_on_the_spaces_python(python, tmp_path):
    """pip resolves requirements.txt for the Space (that Python, Linux x86-64) from PyPI alone, wheels only: the
    Space's build installs with no compiler. The machine's own pip settings (local wheel folders, caps) are left out."""
    if not pypi_reachable():
        pytest.skip("PyPI is not reachable from this machine: the resolution needs it")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
    platforms = [arg for p in SPACE_PLATFORMS for arg in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed", "--only-binary=:all:",
           "--python-version", python, "--implementation", "cp", *platforms, "--target", str(tmp_path / "t"),
           "-r", str(ROOT / "requirements.txt")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]


def tracked_files() -> list[str]:
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    return subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")[:-1]


def is_binary(path: Path) -> bool:
    data = path.read_bytes()
    if b"\0" in data:
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_every_binary_file_is_tracked_by_lfs_for_the_hub():
    binaries = [f for f in tracked_files() if (ROOT / f).is_file() and is_binary(ROOT / f)]
    assert binaries, "the shipped adapter at least is binary"
    out = subprocess.run(["git", "check-attr", "filter", "--", *binaries], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    untracked = [line.split(": filter:")[0] for line in out.splitlines() if not line.endswith(": lfs")]
    assert not untracked, f"add patterns for these to .gitattributes: {untracked[:10]}"
