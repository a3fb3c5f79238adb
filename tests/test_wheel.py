"""The package as users install it: `python -m build` makes a wheel and an sdist, the wheel installs into a
fresh virtual environment, and its `fedstream` command trains from an empty directory.

No network: the build runs without isolation (`build` and setuptools >= 77 come with the test extra),
the wheel is installed with `--no-deps --no-index`, and the fresh environment sees this interpreter's
site-packages (jax, flax, ...) through a `.pth` file, after its own: the `fedstream` it imports is the
installed wheel's, not the checkout's.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import venv
import zipfile

import pytest

import fedstream

pytest.importorskip("build", reason="needs the build package (pip install -e '.[test]')")

ROOT = pathlib.Path(__file__).resolve().parents[1]
# What the wheel must carry besides the fedstream/ sources: the recipes and pipelines (mapped from the
# repository's preprocess/ and pipelines/) and the embedded digits asset.
REQUIRED_IN_WHEEL = ("fedstream/cli.py", "fedstream/recipes/digits.py", "fedstream/recipes/assets/digits.csv.gz",
                     "fedstream/pipelines/digits_fedavg.py")


def _clean_env() -> dict[str, str]:
    """This process's environment without what points Python at the checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}


def _sources(destination: pathlib.Path) -> pathlib.Path:
    """A copy of the checkout's sources (the build writes build/ and *.egg-info next to them)."""
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".ruff_cache")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, destination / name)
    for name in ("fedstream", "preprocess", "pipelines", "tests"):
        shutil.copytree(ROOT / name, destination / name, ignore=ignore)
    return destination


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> pathlib.Path:
    """`python -m build --no-isolation` of a copy of the checkout: the folder holding the wheel and sdist."""
    source = _sources(tmp_path_factory.mktemp("source"))
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)],
                            capture_output=True, text=True, env=_clean_env(), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def installed(dist, tmp_path_factory) -> pathlib.Path:
    """A fresh virtual environment with the built wheel installed (no dependencies, no index): its bin/."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True, env=_clean_env()).stdout.strip()
    # This interpreter's site-packages after the environment's own: dependencies only, no editable finders.
    deps = [p for p in sys.path if p.endswith("site-packages") and pathlib.Path(p).is_dir()]
    (pathlib.Path(purelib) / "_fedstream_test_dependencies.pth").write_text("\n".join(deps) + "\n")
    [wheel] = dist.glob("fedstream-*.whl")
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                             "--no-index", "--no-cache-dir", "--disable-pip-version-check", str(wheel)],
                            capture_output=True, text=True, env=_clean_env(), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return env_dir / "bin"


def test_build_makes_a_wheel_and_an_sdist_with_recipes_pipelines_and_assets(dist):
    [wheel] = dist.glob(f"fedstream-{fedstream.__version__}-py3-none-any.whl")
    [sdist] = dist.glob(f"fedstream-{fedstream.__version__}.tar.gz")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in REQUIRED_IN_WHEEL:
        assert required in names, required
    assert not any(n.startswith(("tests/", "preprocess/", "pipelines/")) for n in names)
    entry_points = zipfile.ZipFile(wheel).read(f"fedstream-{fedstream.__version__}.dist-info/entry_points.txt")
    assert b"fedstream = fedstream.cli:main" in entry_points
    assert sdist.stat().st_size > 0


def test_installed_wheel_trains_from_an_empty_directory(installed, tmp_path):
    """`fedstream --version`, then 1 round of digits_fedavg in an empty directory: the dataset is preprocessed
    from the wheel's embedded asset into ./data/digits and the run goes to ./w."""
    version = subprocess.run([str(installed / "fedstream"), "--version"], capture_output=True, text=True,
                             env=_clean_env(), cwd=tmp_path, timeout=120)
    assert (version.returncode, version.stdout.strip()) == (0, f"fedstream {fedstream.__version__}"), version.stderr
    where = subprocess.run([str(installed / "python"), "-c", "import fedstream.recipes; print(fedstream.recipes.__file__)"],
                           capture_output=True, text=True, env=_clean_env(), cwd=tmp_path, timeout=120)
    assert pathlib.Path(where.stdout.strip()).is_relative_to(installed.parent), where.stdout + where.stderr
    train = subprocess.run([str(installed / "fedstream"), "train", "digits_fedavg", "--workdir", "w",
                            "--config.num_rounds=1"], capture_output=True, text=True, env=_clean_env(), cwd=tmp_path,
                           timeout=600)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert "final test accuracy" in train.stdout
    assert (tmp_path / "data" / "digits" / "_SUCCESS").is_file()
    assert (tmp_path / "w" / "metrics.jsonl").read_text().count('"kind": "train"') == 1
    assert any((tmp_path / "w" / "checkpoints").iterdir())
