"""The tested versions: ``mlxtune/constraints.txt``, the exact set of packages the test suite
passed on, which ``scripts/install.sh`` applies as pip constraints.

Read by ``mlxtune doctor`` (what differs here from the tested set) and by ``scripts/drift.py``
(what the newest versions change, and a candidate for the next lock). Standard library only.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

LOCK_PATH = Path(__file__).parents[1] / "constraints.txt"


def canonical(name: str) -> str:
    """PEP 503 name: ``PyYAML`` and ``pyyaml``, ``typing_extensions`` and ``typing-extensions`` match."""
    return re.sub(r"[-_.]+", "-", name).lower()


def public(version: str) -> str:
    """The version without its local label: torch ``2.13.0+cpu`` is the tested ``2.13.0``."""
    return version.split("+", 1)[0]


def parse_pins(lines: Iterable[str]) -> dict[str, str]:
    """``name==version`` lines (comments, blanks and anything else skipped) -> canonical name -> version."""
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if "==" in line and not line.startswith("-"):
            name, version = line.split("==", 1)
            pins[canonical(name)] = public(version.strip())
    return pins


def read_lock(path: Path = LOCK_PATH) -> dict[str, str]:
    return parse_pins(path.read_text(encoding="utf-8").splitlines())


def installed_versions(names: Iterable[str]) -> dict[str, str | None]:
    """Installed version of each distribution, None where it is not installed."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def differences(lock: Mapping[str, str], installed: Mapping[str, str | None]) -> list[tuple[str, str, str]]:
    """(package, installed, tested) for each locked package installed at another version.

    A locked package that is not installed is no difference: the lock covers every extra and
    both platforms (``mlx-cpu`` on Linux only, ``trl`` with the ``bench`` extra only)."""
    return [(name, have, lock[name]) for name, have in installed.items()
            if name in lock and have is not None and public(have) != lock[name]]


def render_lock(pins: Mapping[str, str], header: Iterable[str]) -> str:
    """A constraints file: the header's comment lines, then one ``name==version`` per line, sorted."""
    lines = [f"# {h}" if h else "#" for h in header]
    lines += [f"{name}=={version}" for name, version in sorted(pins.items())]
    return "\n".join(lines) + "\n"


def main() -> int:
    """``python -m mlxtune.system.lock``: exit 1, listing them, when installed packages differ from the lock."""
    lock = read_lock()
    diff = differences(lock, installed_versions(lock))
    for name, have, want in diff:
        print(f"{name} {have} installed, {want} tested")
    print(f"{len(diff)} of the {len(lock)} locked packages differ from {LOCK_PATH}" if diff else
          f"the lock is in force: every installed package of the {len(lock)} in {LOCK_PATH.name} is at its tested version")
    return 1 if diff else 0


if __name__ == "__main__":
    raise SystemExit(main())
