"""`mlxtune doctor`: the environment report of :func:`mlxtune.system.doctor.collect` as tables."""

from __future__ import annotations

import click


@click.command("doctor")
@click.option("--model", "model", metavar="PATH_OR_ID", default=None,
              help="Check this model instead: load it on every backend here, compare their per-token log-probabilities "
                   "on a fixed multilingual text and their greedy continuations, the chat template's end-of-turn token, "
                   "the pad token and the default recipe's memory plan.")
def doctor_cmd(model: str | None) -> None:
    """Environment report: versions (next to the tested ones), backends, devices, BLAS in use, model cache."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from mlxtune.system import doctor
    from mlxtune.system.lock import canonical

    console = Console()
    if model is not None:
        _model_report(model, [name for name, ok, _ in doctor._backends() if ok], console)
        return
    r = doctor.collect()

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
    t.add_row("distributed", escape(r["distributed"]))
    console.print(t)

    for w in r["warnings"]:
        console.print("[bold yellow]WARNING[/]: " + escape(w))
    if not r["warnings"]:
        console.print("[green]no problems found[/]")


def _model_report(spec: str, backends: list[str], console) -> None:
    """`doctor --model`: the figures of :func:`mlxtune.system.model_check.check_model`."""
    from rich.markup import escape
    from rich.table import Table

    from mlxtune.system.model_check import GEN_TOKENS, check_model
    from mlxtune.units import gib

    r = check_model(spec, backends)
    t = Table(title=f"model {escape(spec)} ({r['model_type']}, {r['tokens']} tokens of multilingual text, float32, adapter off)")
    t.add_column("backend")
    t.add_column("mean NLL / token")
    t.add_column(f"greedy {GEN_TOKENS} ids")
    t.add_column("default recipe plan")
    for name, f in r["backends"].items():
        p = r["plans"].get(name, {})
        plan = escape(p["error"]) if "error" in p else (f"micro_batch {p['micro_batch']}, peak {gib(p['peak'])} of {gib(p['budget'])} ({p['device']})"
                                                         if p["fits"] else f"[red]does not fit[/] {gib(p['budget'])}")
        if "error" in f:
            t.add_row(name, f"[red]{escape(f['error'])}[/]", "-", plan)
        else:
            t.add_row(name, f"{-f['logprobs'].mean():.6f}", " ".join(map(str, f["greedy"])), plan)
    console.print(t)
    for p in r["parity"]:
        console.print(f"parity {p['pair']}: max |log-prob diff| per token = {p['max_abs_logprob_diff']:.2e}; "
                      f"greedy continuations {'equal' if p['greedy_equal'] else '[red]differ[/]'}", soft_wrap=True)
    c = r["chat"]
    console.print(f"stop tokens (eos): {escape(', '.join(c['stop_tokens']) or '-')}; pad token: {escape(str(c['pad']))}"
                  + (" (same as eos: padded positions must be masked, not the eos)" if c["pad_is_eos"] else ""), soft_wrap=True)
    if not c["template"]:
        console.print("[yellow]no chat template[/]: chat-format recipes use mlxtune's built-in template")
    elif c["ends_with_stop"]:
        console.print(f"chat template: an assistant turn ends with {escape(str(c['end_of_turn']))}, a stop token: generation ends there", soft_wrap=True)
    else:
        console.print(f"[bold yellow]WARNING[/]: the chat template ends an assistant turn with {escape(str(c['end_of_turn']))}, "
                      "which is not among the stop tokens: generation will run past the end of the reply; fix "
                      "generation_config.json's eos_token_id or the template", soft_wrap=True)
