"""environment.yml (conda users) must not drift from pyproject.toml (the pip/uv install)."""
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_is_generated_from_pyproject():
    result = subprocess.run([sys.executable, "tools/gen_environment.py", "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_environment_yml_lists_exactly_what_setup_installs():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installed = set(project["dependencies"])
    for extra in ("notebooks", "test", "cute", "triton"):    # the extras `make setup` installs
        installed |= set(project["optional-dependencies"][extra])
    assert set(pip) - {"-e ."} == installed
    assert "python=3.11" in env["dependencies"]
    makefile = (ROOT / "Makefile").read_text()
    assert '".[notebooks,test,cute]"' in makefile and "--requirements triton" in makefile


def test_every_dependency_is_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [r for v in project["optional-dependencies"].values() for r in v]
    assert all("==" in r for r in reqs), [r for r in reqs if "==" not in r]
