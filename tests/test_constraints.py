"""CI installs every package from .ci/constraints.txt (exact pins); the README names the tested versions."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def pins():
    lines = (ROOT / ".ci" / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


def normalised(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_pin_is_exact_and_covers_the_test_extras():
    lines = [line for line in (ROOT / ".ci" / "constraints.txt").read_text().splitlines() if line and line[0] != "#"]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[A-Za-z0-9_.+!-]+", line) for line in lines), lines
    pinned = {normalised(name) for name in pins()}
    setup = (ROOT / "setup.py").read_text()
    for block in re.findall(r'"(?:test|train|bench)": \[([^\]]*)\]', setup):
        for requirement in re.findall(r'"([^"]+)"', block):
            name = normalised(re.split(r"[<>=\[ ]", requirement)[0])
            assert name in pinned, f"{name} is in setup.py's extras but not pinned in .ci/constraints.txt"
    assert {"pip", "setuptools", "wheel", "torch", "kernels"} <= pinned


def test_readme_states_the_pinned_versions():
    readme = (ROOT / "README.md").read_text()
    tested = re.search(r"Tested with: (.*?) \(Python", readme, re.S).group(1)
    named = dict(entry.rsplit(" ", 1) for entry in re.sub(r"\s+", " ", tested).split(", "))
    versions = {normalised(name): version for name, version in pins().items()}
    assert len(named) >= 8
    for name, version in named.items():
        assert versions[normalised(name)] == version, f"README says {name} {version}, the pin is {versions[normalised(name)]}"
