"""The run directory: resolved recipe, metrics.jsonl, evals.jsonl, generations/, checkpoints,
best/, adapters/, report.md. Every file of a run directory is read and written here.

Every directory that holds weights is written under a temporary name and renamed into place,
so a crash or Ctrl-C leaves either the previous complete version or the new complete one.
"""

from __future__ import annotations

import json
import os
import shutil
import tomllib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from mlxtune.errors import MlxtuneError
from mlxtune.files import write_text_atomic

RECIPE = "recipe.resolved.toml"
METRICS = "metrics.jsonl"
EVALS = "evals.jsonl"  # rows of `mlxtune eval`
GENERATIONS = "generations"
REPORT = "report.md"
STATE = "state.json"  # in every checkpoint and in best/
CHECKPOINTS = "checkpoints"
BEST = "best"
FINAL = "adapters"
MARKERS = (RECIPE, METRICS)


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

    def is_run(self) -> bool:
        """Whether training has started here (metrics.jsonl exists)."""
        return (self.path / METRICS).is_file()

    def write_recipe(self, resolved: dict[str, Any]) -> Path:
        """recipe.resolved.toml: the recipe as the run used it."""
        import tomli_w

        return self.write_text(RECIPE, tomli_w.dumps(resolved))

    def recipe(self) -> dict[str, Any] | None:
        return read_recipe(self.path)

    def log(self, event: dict[str, Any]) -> None:
        """Append one event to metrics.jsonl (flushed and synced, so a crash loses at most it)."""
        with open(self.path / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def events(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def truncate_metrics(self, after_step: int) -> None:
        """Drop events past ``after_step`` (a resumed run replays them)."""
        kept = [e for e in self.events() if e.get("step", 0) <= after_step or e["event"] in ("start",)]
        self.write_text(METRICS, "".join(json.dumps(e) + "\n" for e in kept))

    def append_eval(self, row: dict[str, Any]) -> None:
        """Append one row of `mlxtune eval` to evals.jsonl."""
        with open(self.path / EVALS, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def evals(self) -> list[dict[str, Any]]:
        return read_evals(self.path)

    def write_generations(self, name: str, rows: list[dict[str, Any]]) -> Path:
        """generations/<name>: every generated output next to its reference and outcome, for
        reading by hand."""
        path = self.path / GENERATIONS / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    def write_report(self, text: str) -> Path:
        return self.write_text(REPORT, text)

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

    @contextmanager
    def checkpoint_dir(self, step: int, state: dict[str, Any]) -> Iterator[Path]:
        """checkpoints/step-N: the caller writes the weights into the yielded folder, then
        ``state`` goes to its state.json and the folder is renamed into place."""
        with self.atomic_dir(f"{CHECKPOINTS}/step-{step:06d}") as tmp:
            yield tmp
            write_state(tmp, state)

    @contextmanager
    def best_dir(self, state: dict[str, Any]) -> Iterator[Path]:
        """best/, written like a checkpoint (the adapter, then state.json)."""
        with self.atomic_dir(BEST) as tmp:
            yield tmp
            write_state(tmp, state)

    @contextmanager
    def final_dir(self) -> Iterator[Path]:
        """adapters/: the final adapter."""
        with self.atomic_dir(FINAL) as tmp:
            yield tmp

    def checkpoints(self) -> list[tuple[int, Path]]:
        root = self.path / CHECKPOINTS
        if not root.is_dir():
            return []
        out = []
        for p in root.iterdir():
            if p.name.startswith("step-") and (p / STATE).is_file():
                out.append((int(p.name.split("-")[1]), p))
        return sorted(out)

    def prune_checkpoints(self, keep: int) -> None:
        for _, p in self.checkpoints()[:-keep]:
            shutil.rmtree(p, ignore_errors=True)

    def best(self) -> tuple[int, Path] | None:
        """(step, adapter folder) of best/, or None before the first eval."""
        if not (self.path / BEST / "adapter").is_dir():
            return None
        return int(read_state(self.path / BEST)["step"]), self.path / BEST / "adapter"

    def final_adapter(self) -> Path | None:
        """adapters/ once the run finished, else None."""
        return self.path / FINAL if (self.path / FINAL).is_dir() else None


def write_state(folder: Path, state: dict[str, Any]) -> None:
    """state.json of a checkpoint or of best/ (inside a folder that is renamed into place)."""
    (Path(folder) / STATE).write_text(json.dumps(state, indent=2))


def read_state(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / STATE).read_text())


def read_recipe(run: Path) -> dict[str, Any] | None:
    """recipe.resolved.toml as a dict, or None when it is missing or unreadable."""
    try:
        return tomllib.loads((Path(run) / RECIPE).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return None


def read_evals(run: Path) -> list[dict[str, Any]]:
    """Rows written by `mlxtune eval` (the newest row per checkpoint label wins)."""
    path = Path(run) / EVALS
    if not path.is_file():
        return []
    latest: dict[str, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        latest[row["checkpoint"]] = row
    return list(latest.values())


def read_metrics(run: Path) -> list[dict[str, Any]]:
    path = Path(run) / METRICS
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
