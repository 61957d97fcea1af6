"""Derive environment.yml (conda users) from pyproject.toml, the single source of truth.

    python tools/gen_environment.py          # rewrite environment.yml
    python tools/gen_environment.py --check  # exit 1 when environment.yml is stale
    python tools/gen_environment.py --requirements triton  # one extra's pins, for pip

tests/test_environment.py runs the check, so the two files cannot drift.
"""
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def render() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    python = project["requires-python"].split(",")[0].lstrip(">=")
    extras = project["optional-dependencies"]
    pip = list(project["dependencies"])
    for name in ("notebooks", "test", "cute", "triton"):
        pip += extras[name]
    lines = [
        "# Generated from pyproject.toml by tools/gen_environment.py; do not edit by hand.",
        "# GPU users: take torch/triton builds for their CUDA, and",
        "# replace paddlepaddle with paddlepaddle-gpu from Paddle's own index (see README).",
        "name: fp8-moe-blackwell",
        "channels:",
        "  - conda-forge",
        "dependencies:",
        f"  - python={python}",
        "  - pip",
        "  - pip:",
    ]
    lines += [f"      - {req}" for req in pip]
    lines += ["      - -e ."]
    return "\n".join(lines) + "\n"


def main() -> int:
    if "--requirements" in sys.argv:
        extra = sys.argv[sys.argv.index("--requirements") + 1]
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        print(" ".join(project["optional-dependencies"][extra]))
        return 0
    target = ROOT / "environment.yml"
    text = render()
    if "--check" in sys.argv:
        if not target.exists() or target.read_text() != text:
            print("environment.yml is out of date: run python tools/gen_environment.py")
            return 1
        return 0
    target.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
