"""`pip install .` and `pip install -e .` put nothing in the way of other packages (Hugging Face's `evaluate` above
all), and the console scripts work from any folder. A copy of the checkout is installed into a fresh virtual
environment without downloads: this environment's pip and setuptools build it, and the dependencies are this
environment's, through a .pth file."""

import shutil
import subprocess
import sys
import sysconfig
import venv

import pytest

from conftest import ROOT

SCRIPTS = ("ttt-train", "ttt-evaluate", "ttt-generate", "ttt-convert-jax", "ttt-plot-metrics")
OURS = ("ttt", "ttt_e2e", "ttt_math", "ttt_scan", "ttt_kernels", "train_ttt", "train_gpu_optimized",
        "convert_jax_checkpoint", "ttt_train", "ttt_lm")


def fresh_venv(path):
    venv.create(path, with_pip=False)  # this environment's pip installs into it (pip --python)
    site = subprocess.run([str(path / "bin" / "python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies (torch, transformers, ...) of this environment, after the venv's own packages
    with open(f"{site}/zz_dependencies.pth", "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    return path / "bin"


def source_copy(tmp_path):
    ignore = shutil.ignore_patterns(".venv*", ".git", "outputs", "__pycache__", "*.egg-info", "build", "dist")
    return shutil.copytree(ROOT, tmp_path / "src", ignore=ignore)


def check_installed(bin_dir, tmp_path):
    """From an empty folder: `import evaluate` is not ours (Hugging Face's where installed, else absent), no module
    of ours hides another, and each console script answers --help."""
    where = tmp_path / "elsewhere"
    where.mkdir(exist_ok=True)
    probe = ("import importlib.util, sys\n"
             "spec = importlib.util.find_spec('evaluate')\n"
             "print(spec.origin if spec else 'absent')\n"
             "for name in ('generate', 'plot_metrics'):\n"
             "    assert importlib.util.find_spec(name) is None, name\n"
             f"for name in {OURS!r}:\n"
             "    assert importlib.util.find_spec(name) is not None, name\n")
    result = subprocess.run([str(bin_dir / "python"), "-c", probe], cwd=where, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    origin = result.stdout.strip()
    assert origin == "absent" or ("site-packages/evaluate/" in origin and "ttt_lm" not in origin), origin
    for script in SCRIPTS:
        done = subprocess.run([str(bin_dir / script), "--help"], cwd=where, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0 and "usage" in done.stdout, (script, done.stderr[-2000:])


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True], ids=["wheel", "editable"])
def test_install_clashes_with_nothing_and_the_console_scripts_run_anywhere(tmp_path, editable):
    source = source_copy(tmp_path)
    bin_dir = fresh_venv(tmp_path / "venv")
    # built by this environment's setuptools, which the venv sees through the .pth file (nothing downloaded)
    command = [sys.executable, "-m", "pip", "--python", str(bin_dir / "python"), "install", "--no-deps",
               "--no-build-isolation", "--no-index", *(["-e"] if editable else []), str(source)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    check_installed(bin_dir, tmp_path)
