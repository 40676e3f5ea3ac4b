"""The tested versions (mlxtune/constraints.txt): the lock agrees with pyproject.toml's ranges,
`mlxtune doctor` names what differs from it, and the drift script reads pytest and pip right."""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from pathlib import Path

from click.testing import CliRunner
from packaging.requirements import Requirement

from mlxtune.cli.doctor import doctor_cmd
from mlxtune.system import doctor
from mlxtune.system import lock

ROOT = Path(__file__).parent.parent


def requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    return [r for r in reqs if r.name != "mlxtune"]


def test_lock_pins_every_dependency_within_its_range():
    pins = lock.read_lock()
    linux = {"sys_platform": "linux", "platform_system": "Linux"}
    checked = 0
    for req in requirements():
        if req.name == "bitsandbytes" or (req.marker and not req.marker.evaluate(linux)):
            continue  # CUDA-only (not on the machine the suite runs on); the lock is a Linux one
        name = lock.canonical(req.name)
        assert name in pins, f"{req.name} is a dependency but mlxtune/constraints.txt does not pin it"
        assert req.specifier.contains(pins[name], prereleases=True), f"lock {name}=={pins[name]} is outside {req}"
        checked += 1
    assert checked >= 15
    # what scripts/install.sh installs before everything else, and what the suite is known to pass on
    assert pins["torch"] == "2.13.0" and pins["transformers"] != "5.24.0"


def test_lock_file_names_are_canonical_and_unique():
    lines = [ln for ln in lock.LOCK_PATH.read_text().splitlines() if ln and not ln.startswith("#")]
    names = [ln.split("==")[0] for ln in lines]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert all(n == lock.canonical(n) and "+" not in ln for n, ln in zip(names, lines))
    assert lock.render_lock(lock.read_lock(), []) == "\n".join(lines) + "\n"


def test_differences_ignore_local_labels_spelling_and_missing_packages():
    pins = lock.parse_pins(["# a comment", "", "torch==2.13.0", "PyYAML==6.0.4  # why", "transformers==5.23.0",
                            "trl==1.16.0", "-e ."])
    assert pins == {"torch": "2.13.0", "pyyaml": "6.0.4", "transformers": "5.23.0", "trl": "1.16.0"}
    installed = {"torch": "2.13.0+cpu", "pyyaml": "6.0.4", "transformers": "5.24.0", "trl": None, "rich": "15.0.0"}
    assert lock.differences(pins, installed) == [("transformers", "5.24.0", "5.23.0")]


def test_doctor_names_each_package_that_differs_from_the_lock(monkeypatch):
    pins = lock.read_lock()

    def installed(names):
        have = {n: pins.get(lock.canonical(n)) for n in names}
        return have | ({"transformers": "5.24.0"} if "transformers" in have else {})

    monkeypatch.setattr(lock, "installed_versions", installed)
    report = doctor.collect()
    assert report["untested"] == [("transformers", "5.24.0", pins["transformers"])]
    assert report["tested"]["transformers"] == pins["transformers"]
    warning = report["warnings"][-1]
    assert f"transformers 5.24.0 (tested {pins['transformers']})" in warning and str(lock.LOCK_PATH) in warning
    out = CliRunner().invoke(doctor_cmd, [])
    assert out.exit_code == 0 and "tested" in out.output and "1 installed package(s) differ" in out.output

    monkeypatch.setattr(lock, "installed_versions", lambda names: {n: pins.get(lock.canonical(n)) for n in names})
    assert doctor.collect()["untested"] == []


def load_drift():
    spec = importlib.util.spec_from_file_location("drift", ROOT / "scripts" / "drift.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["drift"] = module
    spec.loader.exec_module(module)
    return module


def test_drift_lists_upgrades_and_reads_pytest_outcomes():
    drift = load_drift()
    changed = drift.upgrades({"peft": "0.21.2", "torch": "2.13.0", "gone": "1.0"},
                             {"peft": "0.22.0", "torch": "2.13.0", "new": "2.0"})
    assert changed == {"gone": ("1.0", None), "new": (None, "2.0"), "peft": ("0.21.2", "0.22.0")}
    stdout = "\n".join([
        "..F.x",
        "=========================== short test summary info ============================",
        "FAILED tests/test_generate.py::test_a[prompt] - assert [1] == [2]",
        "ERROR tests/test_models.py::test_b - OSError: no file",
        "XFAIL tests/test_virtual_tokens.py::test_c[prefix] - peft 0.21.2 generate under transformers 5.24.0",
        "1 failed, 3 passed, 1 xfailed, 1 error in 4.20s",
    ])
    failed, xfailed, summary = drift.outcomes(stdout)
    assert failed == ["tests/test_generate.py::test_a[prompt]", "tests/test_models.py::test_b"]
    assert xfailed == ["tests/test_virtual_tokens.py::test_c[prefix] - peft 0.21.2 generate under transformers 5.24.0"]
    assert summary == "1 failed, 3 passed, 1 xfailed, 1 error in 4.20s"
