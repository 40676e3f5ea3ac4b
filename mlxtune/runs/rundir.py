"""The run directory: resolved recipe, metrics.jsonl, checkpoints, best/, adapters/, report.

Every directory that holds weights is written under a temporary name and renamed into place,
so a crash or Ctrl-C leaves either the previous complete version or the new complete one.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from mlxtune.errors import MlxtuneError
from mlxtune.files import write_text_atomic

CHECKPOINTS = "checkpoints"
MARKERS = ("recipe.resolved.toml", "metrics.jsonl")


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    # -- creation ------------------------------------------------------------------
    @staticmethod
    def check(path: Path, overwrite: bool = False, resume: bool = False) -> None:
        """Refuse to mix runs, before any slow work starts."""
        path = Path(path)
        used = path.exists() and any((path / m).exists() for m in MARKERS)
        if used and not (overwrite or resume):
            raise MlxtuneError(f"{path} already holds a run; pass --resume to continue it, --overwrite to replace it, or set output.name")
        if resume and not used:
            raise MlxtuneError(f"--resume: {path} holds no run to resume")

    @classmethod
    def create(cls, path: Path, overwrite: bool = False, resume: bool = False) -> "RunDir":
        path = Path(path)
        cls.check(path, overwrite, resume)
        if overwrite and path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    # -- files ---------------------------------------------------------------------
    def write_text(self, name: str, text: str) -> Path:
        return write_text_atomic(self.path / name, text)

    def write_json(self, name: str, obj: Any) -> Path:
        return self.write_text(name, json.dumps(obj, indent=2) + "\n")

    def log(self, event: dict[str, Any]) -> None:
        """Append one event to metrics.jsonl (flushed and synced, so a crash loses at most it)."""
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def events(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def truncate_metrics(self, after_step: int) -> None:
        """Drop events past ``after_step`` (a resumed run replays them)."""
        kept = [e for e in self.events() if e.get("step", 0) <= after_step or e["event"] in ("start",)]
        self.write_text("metrics.jsonl", "".join(json.dumps(e) + "\n" for e in kept))

    # -- weight directories ----------------------------------------------------------
    @contextmanager
    def atomic_dir(self, rel: str) -> Iterator[Path]:
        """Yield an empty temp folder; on success it replaces ``rel`` as a whole."""
        target = self.path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = target.with_name(f".{target.name}.old")
        if target.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)

    def checkpoints(self) -> list[tuple[int, Path]]:
        root = self.path / CHECKPOINTS
        if not root.is_dir():
            return []
        out = []
        for p in root.iterdir():
            if p.name.startswith("step-") and (p / "state.json").is_file():
                out.append((int(p.name.split("-")[1]), p))
        return sorted(out)

    def prune_checkpoints(self, keep: int) -> None:
        for _, p in self.checkpoints()[:-keep]:
            shutil.rmtree(p, ignore_errors=True)


def read_metrics(run: Path) -> list[dict[str, Any]]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise MlxtuneError(f"{run}: no metrics.jsonl (is this a run directory?)")
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return events


def split_events(events: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any] | None, list[dict[str, Any]]]:
    """(start event or {}, base-model eval or None, adapter evals in order) of a run's events."""
    start = next((e for e in events if e.get("event") == "start"), {})
    base = next((e for e in events if e.get("event") == "eval" and not e.get("adapter", True)), None)
    evals = [e for e in events if e.get("event") == "eval" and e.get("adapter", True)]
    return start, base, evals
