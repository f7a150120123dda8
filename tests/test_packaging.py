"""The package as a user installs it: every third-party module it imports is a declared
dependency (or an extra), and `pip install .` (not editable) into a fresh venv gives a working
`usfmae-fast` with its package data and compiled library (issue 16)."""
import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "usfmae_fast"
# imported only where the package guards it: triton ships with every CUDA torch wheel
GUARDED = {"triton"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [s for extra in project["optional-dependencies"].values()
                                       for s in extra]
    return {_normalise(re.split(r"[<>=!~\[ ;]", spec, maxsplit=1)[0]) for spec in specs}


def _imported_modules() -> dict[str, str]:
    """Top-level module name -> one file importing it, for every import in the package."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def test_every_third_party_import_is_a_declared_dependency():
    distributions = importlib.metadata.packages_distributions()
    declared, missing = _declared(), []
    for module, where in sorted(_imported_modules().items()):
        if module in sys.stdlib_module_names or module in GUARDED or module == "usfmae_fast":
            continue
        dists = {_normalise(d) for d in distributions.get(module, [module])}
        if not dists & declared:
            missing.append(f"{module} (from {sorted(dists)}, imported in {where})")
    assert not missing, "imported but declared nowhere in pyproject.toml: " + "; ".join(missing)


@pytest.mark.slow
def test_pip_install_into_a_fresh_venv_gives_a_working_command(tmp_path):
    # Dependencies come from this environment through a .pth file (torch alone is gigabytes);
    # the package itself is built and installed for real, CPU kernels only (about a minute).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    here = [p for p in sys.path if p.endswith("site-packages")][0]
    Path(site, "deps.pth").write_text(here + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "USFMAE_EXT_PATH")}
    build = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps",
                            "--no-build-isolation", "--no-index", str(ROOT)],
                           env={**env, "USFMAE_SKIP_CUDA": "1"}, capture_output=True,
                           text=True, timeout=1200)
    assert build.returncode == 0, build.stderr[-3000:]

    def run(*args):
        return subprocess.run([str(venv / "bin" / "usfmae-fast"), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    for command in (["--help"], ["pretrain", "--help"], ["finetune", "--help"],
                    ["evaluate", "--help"], ["scorecam", "--help"], ["ingest", "--help"]):
        result = run(*command)
        assert result.returncode == 0 and "usage: usfmae-fast" in result.stdout, \
            (command, result.stderr[-2000:])
    info = json.loads(run("info", "--json").stdout)
    assert info["extension"]["loaded"] and info["extension"]["cpu_kernels"]
    assert info["extension"]["message"].startswith(f"loaded from {site}")
    installed = Path(site, "usfmae_fast")
    assert sorted(p.name for p in (installed / "demo_data" / "bmode_sim").glob("*.csv"))
    bench = run("bench")
    assert bench.returncode == 2 and "benchmarks" in bench.stderr
