"""`mlxtune compare` on fabricated runs, `mlxtune doctor`, and the OpenBLAS helper (no model needed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxtune.cli.compare import compare_cmd
from mlxtune.cli.doctor import doctor_cmd
from mlxtune.runs.compare import compare_runs
from mlxtune.system import blas


def fake_run(path: Path, losses: list[float], evals: dict[tuple[int, bool], tuple[float, float]], backend: str = "mlx") -> Path:
    path.mkdir(parents=True)
    lines = [{"event": "start", "step": 0, "backend": {"backend": backend}}]
    for (step, adapter), (loss, full) in sorted(evals.items()):
        if step == 0:
            lines.append({"event": "eval", "step": 0, "adapter": adapter, "loss": loss, "loss_full": full,
                          "tokens": 400, "tokens_full": 900, "ppl": 1.0, "ppl_full": 1.0})
    for i, loss in enumerate(losses, start=1):
        lines.append({"event": "train", "step": i, "loss": loss, "tokens": 812, "lr": 2e-4, "grad_norm": 1.2,
                      "tokens_per_s": 150.0 + i, "peak_memory": 123456789, "elapsed": float(i)})
        if (i, True) in evals:
            loss_e, full = evals[(i, True)]
            lines.append({"event": "eval", "step": i, "adapter": True, "loss": loss_e, "loss_full": full,
                          "tokens": 400, "tokens_full": 900, "ppl": 1.0, "ppl_full": 1.0})
    lines.append({"event": "end", "step": len(losses)})
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (path / "recipe.resolved.toml").write_text(f'backend = "{backend}"\n\n[train]\nlr = 0.0002\n')
    return path


LOSSES = [2.5, 2.3, 2.1, 1.9]
EVALS = {(0, False): (2.2, 2.7), (2, True): (2.0, 2.5), (4, True): (1.8, 2.3)}


def test_compare_agree(tmp_path):
    a = fake_run(tmp_path / "a", LOSSES, EVALS, "mlx")
    b = fake_run(tmp_path / "b", [x + 2e-4 for x in LOSSES], {k: (v[0] - 3e-4, v[1]) for k, v in EVALS.items()}, "torch")
    res = compare_runs(a, b)
    assert res["agree"]
    assert len(res["train"]) == 4 and len(res["eval"]) == 6
    assert res["max_abs"] == pytest.approx(3e-4, rel=1e-3)
    assert res["max_rel"] == pytest.approx(3e-4 / 1.8, rel=1e-2)  # largest relative: eval loss 1.8
    assert ("backend", "mlx", "torch") in res["recipe_diff"]
    out = CliRunner().invoke(compare_cmd, [str(a), str(b)])
    assert out.exit_code == 0, out.output
    assert "AGREE" in out.output and "train loss per step" in out.output and "eval loss" in out.output


def test_compare_differ(tmp_path):
    a = fake_run(tmp_path / "a", LOSSES, EVALS)
    bad = dict(EVALS)
    bad[(4, True)] = (1.9, 2.3)  # eval loss off by 0.1
    b = fake_run(tmp_path / "b", LOSSES, bad)
    res = compare_runs(a, b)
    assert not res["agree"]
    assert res["max_abs"] == pytest.approx(0.1)
    assert res["worst"]["step"] == 4 and res["worst"]["field"] == "loss"
    out = CliRunner().invoke(compare_cmd, [str(a), str(b)])
    assert out.exit_code == 1
    assert "DIFFER" in out.output
    # a looser tolerance turns it into agreement, absolute or relative
    assert CliRunner().invoke(compare_cmd, [str(a), str(b), "--tol", "0.2"]).exit_code == 0
    assert CliRunner().invoke(compare_cmd, [str(a), str(b), "--rtol", "0.06"]).exit_code == 0


def test_compare_missing_steps_differ(tmp_path):
    a = fake_run(tmp_path / "a", LOSSES, EVALS)
    b = fake_run(tmp_path / "b", LOSSES[:3], {k: v for k, v in EVALS.items() if k[0] < 4})
    res = compare_runs(a, b)
    assert not res["agree"]
    assert "train step 4" in res["only_a"]
    assert CliRunner().invoke(compare_cmd, [str(a), str(b)]).exit_code == 1


def test_compare_not_a_run(tmp_path):
    from mlxtune.errors import MlxtuneError

    (tmp_path / "x").mkdir()
    a = fake_run(tmp_path / "a", LOSSES, EVALS)
    with pytest.raises(MlxtuneError, match="metrics.jsonl"):
        compare_runs(a, tmp_path / "x")


def test_doctor_reports_blas():
    out = CliRunner().invoke(doctor_cmd, [])
    assert out.exit_code == 0, out.output
    assert "BLAS" in out.output
    assert "torch" in out.output and "mlx" in out.output


def test_doctor_names_a_backend_that_does_not_load(monkeypatch):
    """A backend whose framework is missing: the ImportError's first line and the pip extra."""
    import backends
    from mlxtune.system import doctor

    monkeypatch.setitem(backends.BACKENDS, "mlx", ("json.no_such_framework", "MLXBackend", "mlx"))
    rows = {name: (ok, detail) for name, ok, detail in doctor._backends()}
    assert rows["mlx"] == (False, "ModuleNotFoundError: No module named 'json.no_such_framework'; pip install 'mlxtune[mlx]'")
    assert rows["torch"] == (True, "backends.torch_peft.TorchBackend")
    monkeypatch.setitem(backends.BACKENDS, "mlx", ("backends.no_such_module", "MLXBackend", "mlx"))
    assert doctor._backends()[1] == ("mlx", False, "ModuleNotFoundError: No module named 'backends.no_such_module'")


def test_doctor_warns_on_slow_blas(monkeypatch):
    from mlxtune.system import doctor

    monkeypatch.setattr(doctor, "_mlx_info", lambda: {"installed": True, "device": "Device(cpu, 0)", "metal": False})
    monkeypatch.setattr(blas, "blas_in_use", lambda: {"name": "reference BLAS bundled with mlx[cpu] (slow)",
                                                     "path": "/x/mlx_cpu.libs/libblas.so", "slow": True, "preloaded": False})
    monkeypatch.setattr(blas, "openblas_path", lambda: None)
    report = doctor.collect()
    assert report["warnings"] and "apt-get install -y libopenblas0-pthread" in report["warnings"][0]
    out = CliRunner().invoke(doctor_cmd, [])
    assert "WARNING" in out.output and "mlx[cpu]" in out.output


def test_blas_module_does_not_import_mlx():
    import subprocess

    code = "import sys, mlxtune.system.blas, mlxtune.system.doctor, mlxtune.runs.compare; print('mlx' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
    assert out.stdout.strip() == "False False"


def test_reexec_decision(monkeypatch):
    lib = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
    monkeypatch.setattr(blas, "openblas_path", lambda: lib)
    monkeypatch.setattr(sys, "platform", "linux")
    # inside pytest it never re-executes (CliRunner calls the entry point in-process)
    assert blas.should_reexec({}) is None
    monkeypatch.delitem(sys.modules, "pytest")
    monkeypatch.delitem(sys.modules, "mlx", raising=False)
    monkeypatch.setattr(blas.importlib.util, "find_spec", lambda name: object())
    assert blas.should_reexec({}) == lib
    assert blas.should_reexec({"LD_PRELOAD": lib}) is None  # already preloaded
    assert blas.should_reexec({"MLXTUNE_NO_OPENBLAS": "1"}) is None
    assert blas.should_reexec({"MLXTUNE_OPENBLAS_REEXEC": "1"}) is None  # no loops


@pytest.mark.skipif(not sys.platform.startswith("linux") or blas.openblas_path() is None, reason="needs Linux and Debian's OpenBLAS")
def test_entry_point_preloads_openblas(tmp_path):
    """Through a real re-exec: a script calling maybe_reexec_with_openblas ends up on OpenBLAS."""
    pytest.importorskip("mlx.core")
    import os
    import subprocess

    script = tmp_path / "entry.py"
    script.write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom mlxtune.system.blas import maybe_reexec_with_openblas, blas_in_use\n"
        "import os\nmaybe_reexec_with_openblas(sys.argv)\n"
        "print(blas_in_use()['name'], sys.argv[1:], os.environ.get('OMP_WAIT_POLICY'))\n" % str(Path(__file__).parent.parent))
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "MLXTUNE_NO_OPENBLAS", "MLXTUNE_OPENBLAS_REEXEC", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, str(script), "x", "--y"], capture_output=True, text=True, env=env, check=True)
    # torch's OpenMP threads wait passively beside OpenBLAS's threads, unless the user chose otherwise
    assert out.stdout.strip() == "OpenBLAS ['x', '--y'] PASSIVE"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True,
                         env=env | {"OMP_WAIT_POLICY": "ACTIVE"})
    assert out.stdout.strip() == "OpenBLAS [] ACTIVE"
    env["MLXTUNE_NO_OPENBLAS"] = "1"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.startswith("reference BLAS")


def test_openblas_only_for_commands_that_use_mlx(tmp_path):
    """torch trains ~2.5x slower with OpenBLAS preloaded, so only MLX commands get it."""
    mlx_recipe = tmp_path / "m.toml"
    mlx_recipe.write_text('backend = "mlx"\n')
    auto_recipe = tmp_path / "a.toml"
    auto_recipe.write_text("[train]\nsteps = 1\n")
    assert blas.command_uses_mlx(["doctor"])
    assert blas.command_uses_mlx(["run", str(auto_recipe), "--backend", "mlx"])
    assert blas.command_uses_mlx(["run", str(auto_recipe), "--backend=mlx"])
    assert blas.command_uses_mlx(["run", str(auto_recipe), "--set", "backend=mlx"])
    assert blas.command_uses_mlx(["run", str(mlx_recipe)])
    assert not blas.command_uses_mlx(["run", str(mlx_recipe), "--backend", "torch"])
    assert not blas.command_uses_mlx(["run", str(auto_recipe)])
    assert not blas.command_uses_mlx(["validate", str(tmp_path / "missing.toml")])
    # a run directory (generate, chat): the backend it trained on, from its recipe.resolved.toml
    for name, backend in (("mlx-run", "mlx"), ("torch-run", "torch")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "recipe.resolved.toml").write_text(f'backend = "{backend}"\n')
    assert blas.command_uses_mlx(["chat", str(tmp_path / "mlx-run")])
    assert not blas.command_uses_mlx(["generate", str(tmp_path / "torch-run"), "hi"])
    assert not blas.command_uses_mlx(["chat", str(tmp_path / "mlx-run"), "--backend", "torch"])
