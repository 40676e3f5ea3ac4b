"""`mlxtune chat TARGET`: a multi-turn conversation in the terminal (or from piped input). The
conversation is mlxtune/evaluation/chat.py's :class:`~mlxtune.evaluation.chat.Chat`; this module
reads lines, runs commands and prints."""

from __future__ import annotations

import sys

import click

from mlxtune.cli.generate import load_target, resolve_target, sampling_options, target_options
from mlxtune.errors import MlxtuneError

COMMANDS = "/base, /tuned, /system TEXT, /reset, /exit"


def _lines():
    """Input lines: with a prompt and line editing on a terminal, plain reads when piped."""
    stdin = sys.stdin
    tty = stdin.isatty()
    while True:
        try:
            line = input("you> ") if tty else stdin.readline()
        except EOFError:
            return
        if not tty and not line:
            return
        yield line.rstrip("\n")


@click.command("chat")
@target_options
@sampling_options
@click.option("--system", default=None, help="System prompt (default: the run's data.system_prompt).")
def chat_cmd(target: str, adapter: str | None, base: bool, backend: str | None, max_tokens: int, temperature: float,
             top_p: float, seed: int, system: str | None) -> None:
    """Chat with TARGET's model: each line you type is a message; the reply streams as it is
    generated. TARGET is a run directory (its template and system prompt; adapter best/ by default)
    or a model folder (a merged export, embedded:smollm2-135m-instruct: the tokenizer's chat template).

    Commands: /base and /tuned switch the run's adapter off and on for the same history, /system TEXT
    sets the system prompt (empty: none), /reset clears the history, /exit (or end of input) ends.

    Context: the history plus --max-tokens must fit the model's max_position_embeddings, or the run's
    data.max_seq_len when smaller. When it no longer fits, the oldest turns are dropped (a note says so);
    a single message too long for the context is refused.
    """
    from mlxtune.evaluation.chat import Chat, EndChat, context_limit
    from mlxtune.evaluation.generation import GenSettings

    t = resolve_target(target, adapter, base)
    settings = GenSettings(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                           stop=tuple(t.recipe.eval.stop))
    model, tokenizer, config, t = load_target(t, backend)
    limit, reason = context_limit(config, t.recipe.data.max_seq_len if t.is_run else None)
    if max_tokens >= limit:
        raise MlxtuneError(f"--max-tokens {max_tokens}: leaves no room for a message in the context of {limit} tokens ({reason}); lower it")
    chat = Chat(model, tokenizer, t.recipe.data, settings, limit, reason, has_adapter=t.adapter is not None)
    if system is not None:
        chat.system = system

    def note(text: str) -> None:  # notes on stderr (unwrapped), replies alone on stdout
        click.secho(text, dim=True, err=True)

    note(f"chat with {t.label}; context {limit} tokens ({reason}); commands: {COMMANDS}")
    for line in _lines():
        if not line.strip():
            continue
        try:
            if line.startswith("/"):
                note(chat.command(line))
                continue
            chat.reply(line, lambda s: click.echo(s, nl=False), note)
            click.echo()
        except EndChat:
            break
        except MlxtuneError as e:
            note(f"error: {e}")
