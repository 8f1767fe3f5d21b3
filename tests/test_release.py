"""The release check: ``python -m build`` makes an sdist and a wheel, ``twine check`` passes on both, the wheel holds
the package and nothing else, and in a fresh virtual environment the wheel alone (not an editable install) imports and
runs ``wanda-lightning --help``.

It builds in an isolated environment and installs into a new venv, so it needs pip's index or cache: ``torch`` is
installed first at the version CI uses (the CPU wheel), then the wheel with its dependencies.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.release

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # what .ci/run installs; a local CPU wheel from pip's cache


def _run(command: list[str], cwd: Path, timeout: int = 600) -> str:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for module in ("build", "twine"):
        pytest.importorskip(module, reason=f"the release check needs {module}: pip install -e '.[test]'")
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(out), str(ROOT)], cwd=out)
    return out


def test_build_makes_an_sdist_and_a_wheel_that_twine_accepts(dist: Path) -> None:
    sdists, wheels = sorted(dist.glob("*.tar.gz")), sorted(dist.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in dist.iterdir())
    printed = _run([sys.executable, "-m", "twine", "check", "--strict", str(sdists[0]), str(wheels[0])], cwd=dist)
    assert printed.count("PASSED") == 2, printed


def test_wheel_holds_the_package_and_nothing_else(dist: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    outside = [name for name in names if not name.startswith(("wanda_lightning/", "wanda_lightning-"))]
    assert not outside, f"the wheel carries files outside the package: {outside}"
    not_code = [name for name in names if name.startswith("wanda_lightning/") and not name.endswith(".py")]
    assert not not_code, f"the wheel carries data files: {not_code}"
    assert "wanda_lightning/__init__.py" in names and "wanda_lightning/cli/__main__.py" in names
    assert not [name for name in names if "/tests/" in name or name.endswith("/testing.py")]


def test_wheel_alone_installs_imports_and_runs_the_cli(dist: Path, tmp_path: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    python = env_dir / "bin" / "python"
    install = [str(python), "-m", "pip", "install", "-q", "--no-compile"]  # no .pyc of torch's thousands of files
    _run([*install, TORCH], cwd=tmp_path)
    _run([*install, str(wheel)], cwd=tmp_path)
    # Run from an empty folder, so that the repository's own package cannot be the one imported.
    where = _run(
        [
            str(python),
            "-c",
            "import wanda_lightning, sys; print(wanda_lightning.__file__); print(wanda_lightning.__version__)",
        ],
        cwd=tmp_path,
    )
    assert str(env_dir) in where.splitlines()[0], where
    help_text = _run([str(env_dir / "bin" / "wanda-lightning"), "--help"], cwd=tmp_path)
    for command in ("prune", "shrink", "speed", "eval", "inspect", "demo"):
        assert command in help_text, help_text
