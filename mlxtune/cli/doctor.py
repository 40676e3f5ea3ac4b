"""`mlxtune doctor`: the environment report of :func:`mlxtune.system.doctor.collect` as tables."""

from __future__ import annotations

import click


@click.command("doctor")
def doctor_cmd() -> None:
    """Environment report: versions (next to the tested ones), backends, devices, BLAS in use, model cache."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from mlxtune.system import doctor
    from mlxtune.system.lock import canonical

    r = doctor.collect()
    console = Console()

    t = Table(title="mlxtune doctor", show_header=False)
    t.add_column("item", style="bold")
    t.add_column("value")
    t.add_row("mlxtune", r["mlxtune"])
    t.add_row("python", r["python"])
    t.add_row("platform", r["platform"])
    t.add_row("default backend (auto)", r["default_backend"])
    t.add_row("cache dir", r["cache_dir"] + (f"  (models: {', '.join(r['cached_models'])})" if r["cached_models"] else ""))
    console.print(t)

    t = Table(title="packages")
    t.add_column("package")
    t.add_column("version")
    t.add_column("tested")
    untested = {name for name, _, _ in r["untested"]}
    for name, ver in r["packages"].items():
        shown = f"[yellow]{ver}[/]" if canonical(name) in untested else ver
        t.add_row(name, shown, r["tested"][name], style="dim" if ver == "not installed" else None)
    console.print(t)

    t = Table(title="backends and devices")
    t.add_column("item")
    t.add_column("status")
    for name, ok, detail in r["backends"]:
        t.add_row(f"backend {name}", ("[green]ok[/] " if ok else "[red]unavailable[/] ") + escape(detail))
    for name, value in r["torch_devices"]:
        t.add_row(name, value)
    mlx = r["mlx"]
    if mlx["installed"]:
        t.add_row("MLX default device", mlx["device"] + (" (Metal available)" if mlx.get("metal") else ""))
    else:
        t.add_row("MLX", "not installed")
    blas = r["blas"]
    blas_text = escape(blas["name"] + (f" ({blas['path']})" if blas.get("path") else ""))
    t.add_row("BLAS in use (MLX CPU)", f"[red]{blas_text}[/]" if blas.get("slow") else blas_text)
    console.print(t)

    for w in r["warnings"]:
        console.print("[bold yellow]WARNING[/]: " + escape(w))
    if not r["warnings"]:
        console.print("[green]no problems found[/]")
