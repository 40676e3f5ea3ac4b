"""Using a model (`mlxtune generate`, `mlxtune chat`): prompts in a run's own template, one
prompt streamed as it is generated, and a multi-turn conversation that fits the context.

Backend-neutral and framework-free: the backend and tokenizer come in as arguments. Streaming
needs nothing from a backend: ``Backend.generate`` calls ``should_stop(ids_so_far)`` after each
new token, and :class:`TextStream` uses that call to hand the new text to ``emit``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mlxtune.data.records import FORMAT_FIELDS, encode_prompt, render_segments, tokenize_segments
from mlxtune.errors import MlxtuneError
from mlxtune.evaluation.generation import GenSettings, chunk_seed, cut_at_stop, eos_token_ids, stop_checker
from mlxtune.models.source import pad_id
from mlxtune.recipe.schema import DataConfig

if TYPE_CHECKING:
    from backends import Backend

Emit = Callable[[str], None]
# the response field of each format: a prompt row may leave it out (it is not part of the prompt)
_ANSWER = {"prompt_completion": "completion", "alpaca": "output", "translation": "target", "code": "solution",
           "cefr_list": "sentences"}


# ------------------------------------------------------------------ prompts


def user_prompt(text: str, cfg: DataConfig, tokenizer: Any) -> np.ndarray:
    """Token ids of the generation prompt for one user message, in the run's template (with its
    system prompt); for a ``text`` run the text itself, to be continued."""
    if cfg.format == "text":
        segs = [(text, False)]
    else:
        segs = render_segments([{"role": "user", "content": text}], cfg.template, tokenizer, cfg.system_prompt,
                               add_generation_prompt=True)
    return tokenize_segments(segs, tokenizer, cfg).tokens


def row_prompt(row: Any, cfg: DataConfig, tokenizer: Any, where: str) -> np.ndarray:
    """Prompt ids of one input row: a string (the user message), a record of the run's
    ``data.format`` (its response field may be left out), or ``{"prompt": ...}``."""
    if isinstance(row, str) and row:
        return user_prompt(row, cfg, tokenizer)
    if not isinstance(row, dict):
        raise MlxtuneError(f"{where}: expected a string or a JSON object, got {type(row).__name__}; "
                           f"write {{\"prompt\": \"...\"}} or a record of format '{cfg.format}'")
    fmt = "cefr_list" if cfg.format == "cefr_words" else cfg.format
    required = [k for k in FORMAT_FIELDS[fmt][0] if k != _ANSWER.get(fmt)]
    if all(row.get(k) not in (None, "") for k in required):
        if fmt == "text":
            return user_prompt(str(row["text"]), cfg, tokenizer)
        rec = dict(row)
        if fmt == "chat" and isinstance(rec["messages"], list) and not any(
                isinstance(m, dict) and m.get("role") == "assistant" for m in rec["messages"]):
            rec["messages"] = rec["messages"] + [{"role": "assistant", "content": "-"}]
        elif fmt in _ANSWER and rec.get(_ANSWER[fmt]) in (None, ""):
            words = rec.get("words")
            rec[_ANSWER[fmt]] = ["-"] * len(words) if fmt == "cefr_list" and isinstance(words, list) else "-"
        try:
            return encode_prompt(rec, cfg, tokenizer)
        except MlxtuneError as e:
            raise MlxtuneError(f"{where}: {e}") from None
    if isinstance(row.get("prompt"), str) and row["prompt"]:
        return user_prompt(row["prompt"], cfg, tokenizer)
    raise MlxtuneError(f"{where}: the row has neither \"prompt\" nor the fields of format '{cfg.format}' "
                       f"({', '.join(required)}); has: {', '.join(sorted(row)) or 'nothing'}")


# ------------------------------------------------------------------ streaming


class TextStream:
    """``should_stop`` for a one-row ``Backend.generate`` that also emits the text as it grows.

    The whole row is decoded at each token and the new suffix emitted; an incomplete UTF-8 tail
    ("\\ufffd") and a tail that may be the start of a stop string are held back until the
    next token settles them, so what is emitted is always a prefix of the final text."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...], emit: Emit):
        self.tokenizer, self.stops, self.emit = tokenizer, stops, emit
        self.stop_fn = stop_checker(tokenizer, stops)
        self.shown = ""

    def _show(self, text: str) -> None:
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.emit(text[len(self.shown):])
            self.shown = text

    def should_stop(self, ids: list[int]) -> bool:
        text = cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), self.stops)
        text = text.rstrip("\ufffd")
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self._show(text[: len(text) - hold])
        return self.stop_fn is not None and self.stop_fn(ids)

    def finish(self, ids: list[int]) -> str:
        """Emit the rest; returns the final text (as :func:`generate_texts` decodes it)."""
        text = cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), self.stops)
        self._show(text)
        return text


def stream_one(backend: Backend, tokenizer: Any, prompt: np.ndarray, settings: GenSettings, emit: Emit, *,
               adapter: bool = True) -> str:
    """Generate for one prompt, emitting text as it comes; the text and the draws are those of
    ``generate_texts(backend, tokenizer, [prompt], settings)`` (same seed, eos and stops)."""
    stream = TextStream(tokenizer, settings.stop, emit)
    (ids,) = backend.generate([prompt], settings.max_tokens, temperature=settings.temperature, top_p=settings.top_p,
                              seed=chunk_seed(settings.seed, [0]), eos_ids=eos_token_ids(tokenizer),
                              pad_id=pad_id(tokenizer), adapter=adapter, should_stop=stream.should_stop)
    return stream.finish(ids)


# ------------------------------------------------------------------ conversation


def context_limit(config: dict[str, Any], max_seq_len: int | None) -> tuple[int, str]:
    """Tokens a conversation may use and where that number comes from: the model's
    ``max_position_embeddings``, or the run's ``data.max_seq_len`` when it is smaller (the
    adapter never saw longer sequences)."""
    positions = int(config.get("max_position_embeddings") or 0) or None
    if max_seq_len is not None and (positions is None or max_seq_len < positions):
        return max_seq_len, f"the run's data.max_seq_len = {max_seq_len}"
    if positions is None:
        raise MlxtuneError("config.json: no max_position_embeddings; the chat cannot tell the model's context length")
    return positions, f"the model's max_position_embeddings = {positions}"


class EndChat(Exception):
    """/exit was typed."""


@dataclass
class Chat:
    """A multi-turn conversation with one loaded model. ``has_adapter``: whether the backend
    holds a trained adapter (a run); ``tuned`` switches it on and off for the same history.

    When the history plus ``settings.max_tokens`` outgrows ``limit`` the oldest turns (a user
    message and the replies after it) are dropped before the next reply, and the reply says
    so; a single message too long for the context is refused (and not kept)."""

    backend: Any
    tokenizer: Any
    cfg: DataConfig
    settings: GenSettings
    limit: int
    limit_reason: str
    has_adapter: bool
    tuned: bool = True
    messages: list[dict[str, str]] = field(default_factory=list)
    turns: int = 0

    def __post_init__(self) -> None:
        self.tuned = self.tuned and self.has_adapter
        self.system = self.cfg.system_prompt

    def command(self, line: str) -> str:
        """Run a /command; returns the note to show."""
        name, _, arg = line.strip().partition(" ")
        if name in ("/exit", "/quit"):
            raise EndChat
        if name == "/reset":
            self.messages = []
            return "history cleared"
        if name == "/system":
            self.system = arg.strip()
            return f"system prompt set to {self.system!r}" if self.system else "system prompt removed"
        if name in ("/base", "/tuned"):
            if not self.has_adapter:
                return "this model has no adapter (a model folder, a merged export or --base): /base and /tuned do nothing"
            self.tuned = name == "/tuned"
            return "adapter off: replies come from the base model" if not self.tuned else "adapter on: replies come from the fine-tuned model"
        return f"unknown command {name!r}; commands: /base, /tuned, /system TEXT, /reset, /exit"

    def prompt_ids(self) -> np.ndarray:
        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        segs = render_segments(msgs, self.cfg.template, self.tokenizer, "", add_generation_prompt=True)
        return tokenize_segments(segs, self.tokenizer, self.cfg).tokens

    def fit(self) -> tuple[np.ndarray, str | None]:
        """The prompt ids, dropping the oldest turns until prompt + max_tokens fit the context."""
        room = self.limit - self.settings.max_tokens
        history, self.messages = self.messages, self.messages[-1:]
        alone = len(self.prompt_ids())
        self.messages = history
        if alone > room:  # refused before any turn is dropped: the history stays as it was
            self.messages = self.messages[:-1]
            raise MlxtuneError(f"the message is {alone} tokens as a prompt; with --max-tokens {self.settings.max_tokens} "
                               f"it does not fit the context of {self.limit} tokens ({self.limit_reason}): write a "
                               "shorter message or lower --max-tokens")
        ids, dropped = self.prompt_ids(), 0
        while len(ids) > room:
            starts = [i for i, m in enumerate(self.messages) if m["role"] == "user"]
            self.messages = self.messages[starts[1]:]
            dropped += 1
            ids = self.prompt_ids()
        note = None
        if dropped:
            note = (f"the history outgrew the context of {self.limit} tokens ({self.limit_reason}) with --max-tokens "
                    f"{self.settings.max_tokens}: dropped the oldest {dropped} turn(s); /reset starts afresh")
        return ids, note

    def reply(self, text: str, emit: Emit, note: Emit) -> str:
        """Add the user's message, generate the reply (emitted as it comes) and keep it."""
        self.messages.append({"role": "user", "content": text})
        ids, dropped = self.fit()
        if dropped:
            note(dropped)
        settings = GenSettings(max_tokens=self.settings.max_tokens, temperature=self.settings.temperature,
                               top_p=self.settings.top_p, seed=self.settings.seed + self.turns, stop=self.settings.stop)
        self.turns += 1
        out = stream_one(self.backend, self.tokenizer, ids, settings, emit, adapter=self.tuned)
        self.messages.append({"role": "assistant", "content": out})
        return out
