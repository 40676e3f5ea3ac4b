"""The run directory: resolved recipe, metrics.jsonl, evals.jsonl, generations/, checkpoints,
best/, adapters/, report.md. Every file of a run directory is read and written here.

Every directory that holds weights is written under a temporary name and renamed into place,
so a crash or Ctrl-C leaves either the previous complete version or the new complete one; a full
disk leaves the previous one and says how much space was needed. One process at a time writes a
run directory (:func:`run_lock`).
"""

from __future__ import annotations

import json
import os
import shutil
import tomllib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from mlxtune.errors import MlxtuneError
from mlxtune.files import is_disk_full, tree_size, write_text_atomic
from mlxtune.units import gib

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
        # called with each event after it is in metrics.jsonl (the run's trackers: runs/trackers.py)
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

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
        _check_creatable(path)

    @classmethod
    def create(cls, path: Path, overwrite: bool = False, resume: bool = False) -> "RunDir":
        path = Path(path)
        cls.check(path, overwrite, resume)
        if overwrite and path.exists():
            shutil.rmtree(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MlxtuneError(f"output.dir: cannot create the run directory {path} ({e.strerror or e}); "
                               "set output.dir to a folder you can write") from None
        run = cls(path)
        run.recover()
        return run

    # -- files ---------------------------------------------------------------------
    def write_text(self, name: str, text: str) -> Path:
        with _disk_space(self.path / name, lambda: len(text.encode("utf-8")), "the previous version of the file is intact"):
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
        line = json.dumps(event) + "\n"
        with _disk_space(self.path / METRICS, lambda: len(line.encode("utf-8")), "the events logged before are intact"):
            with open(self.path / METRICS, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        for listener in self.listeners:
            listener(event)

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
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        with _disk_space(path, lambda: len(text.encode("utf-8")), "the previous version of the file is intact"):
            return write_text_atomic(path, text)

    def write_report(self, text: str) -> Path:
        return self.write_text(REPORT, text)

    # -- weight directories ----------------------------------------------------------
    @contextmanager
    def atomic_dir(self, rel: str, need: Callable[[], int] | None = None) -> Iterator[Path]:
        """Yield an empty temp folder; on success it replaces ``rel`` as a whole.

        A full disk (the write raised ENOSPC/EDQUOT) removes the temp folder and raises an
        MlxtuneError saying how much was needed: the most of what was written, the previous
        version's size and ``need()`` (the caller's estimate)."""
        target = self.path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        _restore(target)
        tmp = target.with_name(f".{target.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            yield tmp
        except BaseException as e:
            full = isinstance(e, Exception) and is_disk_full(e)
            written = tree_size(tmp) if full else 0
            shutil.rmtree(tmp, ignore_errors=True)
            if full:
                needed = max(written, tree_size(target), need() if need else 0)
                raise disk_full_error(target, needed, f"nothing was replaced: {rel} and the run's other checkpoints, "
                                      f"{BEST}/ and {FINAL}/ are as they were") from None
            raise
        old = target.with_name(f".{target.name}.old")
        if target.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)

    @contextmanager
    def checkpoint_dir(self, step: int, state: dict[str, Any], need: Callable[[], int] | None = None) -> Iterator[Path]:
        """checkpoints/step-N: the caller writes the weights into the yielded folder, then
        ``state`` goes to its state.json and the folder is renamed into place. ``need``: the
        caller's estimate of its size, for the disk-full message (the newest checkpoint's size
        counts too)."""
        newest = next(reversed([p for _, p in self.checkpoints()]), None)

        def needed() -> int:
            return max(tree_size(newest) if newest else 0, need() if need else 0)

        with self.atomic_dir(f"{CHECKPOINTS}/step-{step:06d}", needed) as tmp:
            yield tmp
            write_state(tmp, state)

    @contextmanager
    def best_dir(self, state: dict[str, Any], need: Callable[[], int] | None = None) -> Iterator[Path]:
        """best/, written like a checkpoint (the adapter, then state.json)."""
        with self.atomic_dir(BEST, need) as tmp:
            yield tmp
            write_state(tmp, state)

    @contextmanager
    def final_dir(self, need: Callable[[], int] | None = None) -> Iterator[Path]:
        """adapters/: the final adapter."""
        with self.atomic_dir(FINAL, need) as tmp:
            yield tmp

    def recover(self) -> None:
        """Finish what a killed writer left: a weight folder that :meth:`atomic_dir` had moved
        aside (``.name.old``) while its new version never landed is put back, and unfinished
        temp folders and half-deleted checkpoints are removed. Only the process holding :func:`run_lock` may call it."""
        for folder in (self.path, self.path / CHECKPOINTS):
            if not folder.is_dir():
                continue
            for p in list(folder.iterdir()):
                if p.name.startswith(".") and p.name.endswith(".old") and p.is_dir():
                    _restore(p.with_name(p.name[1:-len(".old")]))
                elif p.name.startswith(".") and p.name.endswith((".tmp", ".del")) and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)

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
            # hidden first, so a kill mid-delete never leaves a listed checkpoint without its files
            gone = p.with_name(f".{p.name}.del")
            os.replace(p, gone)
            shutil.rmtree(gone, ignore_errors=True)

    def best(self) -> tuple[int, Path] | None:
        """(step, adapter folder) of best/, or None before the first eval."""
        if not (self.path / BEST / "adapter").is_dir():
            return None
        return int(read_state(self.path / BEST)["step"]), self.path / BEST / "adapter"

    def final_adapter(self) -> Path | None:
        """adapters/ once the run finished, else None."""
        return self.path / FINAL if (self.path / FINAL).is_dir() else None


def _restore(target: Path) -> None:
    """``target`` back from ``.target.old`` when a kill fell between atomic_dir's two renames;
    the ``.old`` folder is dropped when the new version did land."""
    old = target.with_name(f".{target.name}.old")
    if not old.is_dir():
        return
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(old, target)


def _bytes(n: int) -> str:
    return gib(n) if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


def disk_full_error(where: Path, needed: int, kept: str) -> MlxtuneError:
    """The error for a write to ``where`` that found the disk (or the quota) full: how much it
    needed, how much is free there, what is intact (``kept``) and what to do."""
    folder = Path(where).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    return MlxtuneError(f"{where}: disk full while writing it (about {_bytes(needed)} needed, {_bytes(free)} free there); "
                        f"{kept}; free some space (or lower train.keep_checkpoints), then continue with --resume")


@contextmanager
def _disk_space(where: Path, needed: Callable[[], int], kept: str) -> Iterator[None]:
    """A full disk during the block becomes :func:`disk_full_error`."""
    try:
        yield
    except OSError as e:
        if not is_disk_full(e):
            raise
        raise disk_full_error(where, needed(), kept) from None


@contextmanager
def run_lock(path: Path) -> Iterator[Path]:
    """Hold the lock of run directory ``path`` during the block (`mlxtune run`, `--resume`, and
    `eval` writing into a run): another process asking for it meanwhile is refused with this
    process's id. Yields the lock file.

    ``fcntl.flock`` on ``<parent>/.<name>.lock``, next to the run directory so that --overwrite
    may delete the directory meanwhile. The kernel drops a flock when its process ends, however
    it ends, so the file a killed process leaves behind blocks nobody and a reused pid cannot
    look alive; the pid and host written into it are for the message only."""
    import fcntl
    import socket

    path = Path(path).absolute()
    lock = path.parent / f".{path.name}.lock"
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = _locked_fd(lock, fcntl)
    except OSError as e:
        raise MlxtuneError(f"{lock.parent}: cannot write the run's lock file there ({e.strerror or e}); "
                           "make the folder writable or set output.dir to one that is") from None
    if fd is None:
        raise MlxtuneError(f"{path}: in use by {_holder(lock)} (lock file {lock}); wait for that run or eval to "
                           "finish, or stop it, then try again")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        yield lock
    finally:
        lock.unlink(missing_ok=True)  # still holding it: see _locked_fd
        os.close(fd)


@contextmanager
def locked_if_run(path: Path) -> Iterator[None]:
    """:func:`run_lock` around the block when ``path`` holds a run (`mlxtune eval` writing into
    it), with what a killed writer left put right first (:meth:`RunDir.recover`); else nothing."""
    if not RunDir(path).is_run():
        yield
        return
    with run_lock(path):
        RunDir(path).recover()
        yield


def _locked_fd(lock: Path, fcntl: Any) -> int | None:
    """An fd holding the flock of ``lock``, or None when another process holds it."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        # the holder before us unlinks the file when it lets go: if we opened that one, we hold
        # a lock on a file nobody else can see; open the current one instead
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _holder(lock: Path) -> str:
    """Who holds ``lock``, as the holder wrote it into the file."""
    try:
        pid, host = (lock.read_text(encoding="utf-8").split() + ["", ""])[:2]
    except OSError:
        pid = host = ""
    return f"process {pid} on {host}" if pid else "another process (starting up)"


def _check_creatable(path: Path) -> None:
    """The run directory can be made: its nearest existing ancestor is a folder this process may
    write (checked before any slow work, so a typo in output.dir costs nothing)."""
    path = Path(path).absolute()
    near = next(p for p in (path, *path.parents) if p.exists())
    if not near.is_dir():
        raise MlxtuneError(f"output.dir: cannot create the run directory {path}: {near} is a file, not a folder; "
                           "set output.dir to a folder")
    if not os.access(near, os.W_OK | os.X_OK):
        raise MlxtuneError(f"output.dir: {near} is not writable, so the run directory {path} cannot be made there; "
                           "set output.dir to a folder you can write")


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
