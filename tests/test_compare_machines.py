"""`mlxtune compare` across machines: the start event names the machine, the default tolerance
follows the runs' dtypes, each side's hardware is in the report, and a run directory copied from
another machine compares against a local one. Two tiny torch runs (fp32, bf16 autocast) shared by
the module."""

from __future__ import annotations

import getpass
import json
import shutil
import socket
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import TINY_RECIPE_HEAD, TINY_RECORDS, write_jsonl
from mlxtune.cli.main import cli
from mlxtune.runs.compare import TOL_FP32, TOL_HALF, TOL_QUANTIZED, auto_tolerance, compare_runs, precision
from mlxtune.runs.machine import machine, machine_line


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """{"fp32": run dir, "bf16": run dir}: the same 4 steps on torch, the second under bf16 autocast."""
    root = tmp_path_factory.mktemp("cmp_machines")
    write_jsonl(root / "train.jsonl", TINY_RECORDS * 4)
    (root / "r.toml").write_text(TINY_RECIPE_HEAD.format(model=tiny_model_dir) + f'''
[train]
steps = 4
lr = 1e-2
micro_batch = 4
eval_every = 2

[output]
dir = "{root / 'runs'}"
''')
    out = {}
    for name, sets in (("fp32", []), ("bf16", ["--set", "train.autocast=bfloat16"])):
        res = invoke("run", root / "r.toml", "--backend", "torch", "--no-progress", "--set", f"output.name={name}", *sets)
        assert res.exit_code == 0, res.output
        out[name] = root / "runs" / name
    return out


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def set_start(run: Path, **fields) -> None:
    """Rewrite the start event of ``run`` with ``fields`` (None: the key is removed)."""
    evs = events(run)
    start = next(e for e in evs if e["event"] == "start")
    for k, v in fields.items():
        start.pop(k, None) if v is None else start.__setitem__(k, v)
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evs))


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_start_event_names_the_machine_and_not_the_host(runs):
    m = next(e for e in events(runs["fp32"]) if e["event"] == "start")["machine"]
    assert m == json.loads(json.dumps(machine()))  # the same machine, JSON as written
    assert m["os"] and m["arch"] and m["cpu"] and m["cores"] >= 1
    text = json.dumps(m)
    assert socket.gethostname() not in text
    user = getpass.getuser()
    assert len(user) < 3 or user not in text
    assert machine_line(m).startswith(f"{m['os']} {m['arch']}, {m['cpu']}, {m['cores']} cores")


def test_auto_tolerance_fp32_pair_is_tight(runs, tmp_path):
    b = copy_run(runs["fp32"], tmp_path / "again")
    res = compare_runs(runs["fp32"], b)
    assert res["tol"] == TOL_FP32 == 1e-3 and res["tol_why"] == "fp32 vs fp32: 1e-3"
    assert res["agree"] and res["max_abs"] == 0.0


def test_auto_tolerance_bf16_side_is_wider_and_tol_overrides(runs, tmp_path):
    res = compare_runs(runs["fp32"], runs["bf16"])
    assert res["tol"] == TOL_HALF and res["tol_why"] == "bf16 autocast on side b: 5e-2"
    assert 0 < res["max_abs"] < TOL_HALF and res["agree"]  # bf16 rounding: a difference, within the bound
    out = invoke("compare", runs["fp32"], runs["bf16"])
    assert out.exit_code == 0, out.output
    assert "AGREE" in out.output and "tolerance bf16 autocast on side b: 5e-2 absolute" in out.output
    assert "autocast bfloat16 on " in out.output  # side b's backend line
    # an explicit --tol wins over the automatic one, either way
    out = invoke("compare", runs["fp32"], runs["bf16"], "--tol", "1e-7")
    assert out.exit_code == 1 and "DIFFER" in out.output and "tolerance --tol 1e-7 absolute" in out.output
    assert compare_runs(runs["bf16"], runs["fp32"], tol=1e-7)["tol_why"] == "--tol 1e-7"


@pytest.mark.parametrize("recipe, start, expected", [
    ({"backend": "torch", "model.dtype": "float32", "train.autocast": "off"}, {}, ("fp32", "fp32")),
    ({"backend": "mlx", "model.dtype": "float32", "train.autocast": "bfloat16"}, {}, ("fp32", "fp32")),  # MLX ignores autocast
    ({"backend": "mlx", "model.dtype": "bfloat16"}, {}, ("half", "bf16")),
    ({"backend": "torch", "model.dtype": "float16"}, {}, ("half", "fp16")),
    ({"backend": "mlx", "adapter.method": "qlora", "model.quantize_bits": 0}, {}, ("quantized", "4-bit base")),
    ({"backend": "torch", "adapter.method": "lora", "model.quantize_bits": 8}, {}, ("quantized", "8-bit base")),
    (None, {"backend": {"backend": "torch", "dtype": "float32", "autocast": "bfloat16"}}, ("half", "bf16 autocast")),
    (None, {"backend": {"backend": "mlx", "dtype": "float32", "quantization": "mlx affine 4-bit"}}, ("quantized", "quantized base")),
    (None, {}, ("fp32", "fp32")),  # nothing recorded: the default recipe
])
def test_precision_of_a_side(recipe, start, expected):
    assert precision(recipe, start) == expected


def test_auto_tolerance_takes_the_wider_side():
    assert auto_tolerance({"a": ("fp32", "fp32"), "b": ("fp32", "fp32")}) == (1e-3, "fp32 vs fp32: 1e-3")
    assert auto_tolerance({"a": ("half", "bf16"), "b": ("half", "fp16")}) == (TOL_HALF, "bf16 on side a, fp16 on side b: 5e-2")
    assert auto_tolerance({"a": ("quantized", "4-bit base"), "b": ("half", "bf16")}) == (TOL_QUANTIZED, "4-bit base on side a: 2.5e-1")
    assert TOL_FP32 < TOL_HALF < TOL_QUANTIZED


def test_old_run_without_machine_still_compares(runs, tmp_path):
    old = copy_run(runs["fp32"], tmp_path / "old")
    set_start(old, machine=None)
    res = compare_runs(old, runs["fp32"])
    assert res["agree"] and res["sides"]["a"].endswith("on unknown machine")
    assert res["sides"]["b"].endswith("on " + machine_line(machine()))
    out = invoke("compare", old, runs["fp32"])
    assert out.exit_code == 0 and "unknown machine" in out.output


def test_run_copied_from_another_machine(runs, tmp_path):
    """A run directory from a Mac (foreign absolute paths inside it, another backend) against a local one."""
    mac = copy_run(runs["fp32"], tmp_path / "elsewhere" / "mac-run")
    set_start(mac, machine={"os": "Darwin", "os_release": "24.1.0", "arch": "arm64", "cpu": "Apple M2", "cores": 8,
                            "memory": 16 * 2**30, "accelerator": "Apple M2 (Metal)", "accelerator_memory": 16 * 2**30},
              backend={"backend": "mlx", "device": "gpu (Metal)", "dtype": "float32", "quantization": "none", "mlx": "0.32.4"},
              model_dir="/Users/someone/models/tiny")
    recipe = (mac / "recipe.resolved.toml").read_text()
    (mac / "recipe.resolved.toml").write_text(recipe.replace(str(runs["fp32"].parent), "/Users/someone/runs")
                                              .replace('backend = "torch"', 'backend = "mlx"'))
    md = tmp_path / "cmp.md"
    out = invoke("compare", mac, runs["fp32"], "--markdown", md)
    assert out.exit_code == 0, out.output
    local = machine_line(machine())
    mac_line = "mlx 0.32.4 gpu (Metal) float32 on Darwin arm64, Apple M2, 8 cores, 16 GiB RAM, Apple M2 (Metal) 16 GiB"
    flat = " ".join(out.output.split())  # rich may wrap long lines
    assert mac_line in flat and local in flat
    assert "AGREE" in out.output and "fp32 vs fp32: 1e-3" in flat
    text = md.read_text()
    assert f"- a (`mac-run`): {mac_line}" in text
    assert "- b (`fp32`): torch " in text and f" on {local}" in text
    assert "**AGREE**:" in text and "tolerance fp32 vs fp32: 1e-3 absolute" in text


def test_machine_names_the_accelerator_of_the_loaded_framework(monkeypatch):
    """CUDA through an imported torch, Metal through an imported mlx.core (stand-ins: no GPU here)."""
    from types import SimpleNamespace as NS

    cuda = NS(is_available=lambda: True, current_device=lambda: 0, device_count=lambda: 2,
              get_device_name=lambda i: "NVIDIA H200", get_device_properties=lambda i: NS(total_memory=141 * 2**30))
    monkeypatch.setitem(sys.modules, "torch", NS(cuda=cuda))
    m = machine()
    assert (m["accelerator"], m["accelerator_memory"], m["accelerator_count"]) == ("NVIDIA H200", 141 * 2**30, 2)
    assert machine_line(m).endswith(", 2 x NVIDIA H200 141 GiB")
    monkeypatch.setitem(sys.modules, "torch", NS(cuda=NS(is_available=lambda: False)))
    metal = NS(is_available=lambda: True, device_info=lambda: {"device_name": "Apple M2", "memory_size": 16 * 2**30})
    monkeypatch.setitem(sys.modules, "mlx.core", NS(metal=metal))
    assert machine_line(machine()).endswith(", Apple M2 (Metal) 16 GiB")
    monkeypatch.setitem(sys.modules, "mlx.core", NS(metal=NS(is_available=lambda: False)))
    assert "accelerator" not in machine()
