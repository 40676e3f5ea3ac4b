"""Records -> messages -> rendered text -> token ids + loss mask (numpy only).

Every backend gets its examples from here, so both train on the same ids and masks. Training
examples, eval examples and generation prompts are all rendered by :func:`render_segments`,
which is why the train and test prompt formats cannot drift apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlxtune.errors import MlxtuneError
from mlxtune.recipe.schema import DataConfig, Recipe
from mlxtune.data.wordlists import group_rows, split_and_group

# format -> (required fields, optional fields)
FORMAT_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "chat": (("messages",), ()),
    "prompt_completion": (("prompt", "completion"), ()),
    "alpaca": (("instruction", "output"), ("input",)),
    "text": (("text",), ()),
    "translation": (("source", "target"), ()),
    "cefr_list": (("level", "words", "sentences"), ()),
    "cefr_words": (("word", "sentence"), ("level",)),  # rows grouped into cefr_list records (mlxtune.data.wordlists)
    "code": (("problem", "solution"), ("test", "entry_point")),  # optional: for pass@k (see sandbox.humaneval_program)
}
ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One tokenized example. ``loss_mask[t]`` marks token t as a response target."""

    tokens: np.ndarray  # int32[n]
    loss_mask: np.ndarray  # bool[n]; loss_mask[0] is always False

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class DataStats:
    records: int = 0
    kept: int = 0
    overlong: int = 0
    truncated: int = 0
    dropped: int = 0
    lengths: list[int] = field(default_factory=list)
    kept_rows: list[int] = field(default_factory=list)  # input positions of the kept examples

    def summary(self) -> dict[str, Any]:
        lens = np.array(self.lengths or [0])
        return {
            "records": self.records, "examples": self.kept, "overlong": self.overlong,
            "truncated": self.truncated, "dropped": self.dropped,
            "min_len": int(lens.min()), "mean_len": round(float(lens.mean()), 1), "max_len": int(lens.max()),
            "tokens": int(lens.sum()),
        }


# ------------------------------------------------------------------ loading records


def load_records(source: str, cfg: DataConfig, where: str) -> list[dict[str, Any]]:
    """Rows of a local file or hub dataset, with ``cfg.columns`` renamed to the format's fields.

    .jsonl and .json are read with the standard library so a malformed row is reported by its
    line number; csv, parquet and hub ids go through ``datasets``.
    """
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".csv", ".parquet"):
        if not path.is_file():
            raise MlxtuneError(f"{where}: data file not found: {path} (relative paths are resolved against the recipe's folder)")
        if path.stat().st_size == 0:
            raise MlxtuneError(f"{path}: the file is empty; add records with the fields of format '{cfg.format}' "
                               f"({', '.join(FORMAT_FIELDS[cfg.format][0])})")
        if suffix == ".jsonl":
            rows = []
            for i, line in enumerate(_read_text(path).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise MlxtuneError(f"{path}:{i}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        elif suffix == ".json":
            try:
                rows = json.loads(_read_text(path))
            except json.JSONDecodeError as e:
                raise MlxtuneError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
            if isinstance(rows, dict) and len(rows) == 1 and isinstance(next(iter(rows.values())), list):
                rows = next(iter(rows.values()))  # {"data": [...]} style files
            if not isinstance(rows, list):
                raise MlxtuneError(f"{path}: a .json data file must hold a list of records")
        else:
            rows = _load_with_datasets(suffix.lstrip("."), {"data_files": str(path), "split": "train"}, str(path))
    elif path.exists():
        raise MlxtuneError(f"{where}: unsupported data file type '{path.suffix}' ({path}); use .jsonl, .json, .csv or .parquet")
    else:
        rows = _load_with_datasets(source, {"split": cfg.split} | ({"name": cfg.subset} if cfg.subset else {}), source)
    bad = next((i for i, r in enumerate(rows, 1) if not isinstance(r, dict)), None)
    if bad:
        raise MlxtuneError(f"{source}: record {bad} is not a JSON object; each record must be an object with the "
                           f"fields of format '{cfg.format}' ({', '.join(FORMAT_FIELDS[cfg.format][0])})")
    if not rows:
        raise MlxtuneError(f"{source}: the dataset is empty; add records with the fields of format '{cfg.format}' "
                           f"({', '.join(FORMAT_FIELDS[cfg.format][0])})")
    if cfg.columns:
        rows = [_rename(r, cfg.columns, source, i) for i, r in enumerate(rows, 1)]
    return rows


def _read_text(path: Path) -> str:
    """A data file's text; bytes that are not UTF-8 are reported with their line (a BOM is fine)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise MlxtuneError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8 "
                           "(e.g. iconv -f latin1 -t utf-8)") from None


def _rename(row: dict[str, Any], columns: dict[str, str], source: str, i: int) -> dict[str, Any]:
    """``columns`` maps the format's field name -> the dataset's column name; a dotted name reads a
    nested field (``translation.en`` of OPUS-style rows ``{"translation": {"en": ..., "tr": ...}}``).
    A column the record does not have is an error naming data.columns (not a missing field)."""
    out = {k: v for k, v in row.items() if k not in {c.split(".", 1)[0] for c in columns.values()}}
    for name, column in columns.items():
        value: Any = row
        for part in column.split("."):
            if not isinstance(value, dict) or part not in value:
                raise MlxtuneError(f"{source}: record {i}: data.columns maps {name} -> '{column}', but the record has no "
                                   f"column '{column}' (has: {', '.join(sorted(row)) or 'nothing'}); fix data.columns")
            value = value[part]
        out[name] = value
    return out


def _load_with_datasets(name: str, kwargs: dict[str, Any], label: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ModuleNotFoundError:
        raise MlxtuneError(f"reading {label} needs the 'datasets' package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, **kwargs)
    except FileNotFoundError as e:
        raise MlxtuneError(f"{label}: dataset not found locally or on the hub ({e}); give a local .jsonl/.json/.csv/.parquet path or a hub dataset id") from None
    except ConnectionError as e:
        raise MlxtuneError(f"{label}: could not reach the dataset hub ({e}); use a local file when offline") from None
    except Exception as e:  # datasets, pandas and pyarrow raise many types; the reader's own error is the cause
        cause = e.__cause__ or e
        why = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else 'no details'}"
        if name in _FIX:
            raise MlxtuneError(f"{label}: cannot be read as {name.upper() if name == 'csv' else 'Parquet'} ({why}); "
                               f"{_FIX[name]}, or convert it to .jsonl") from None
        raise MlxtuneError(f"{label}: the dataset does not load ({why}); check data.train/data.subset/data.split, "
                           "or give a local .jsonl/.json/.csv/.parquet file") from None
    return ds.to_list()


_FIX = {"csv": "save it as UTF-8 text with a header row naming the columns",
        "parquet": "write it again (e.g. pandas' DataFrame.to_parquet)"}


# ------------------------------------------------------------------ records -> messages


def _field_error(source: str, row: int, msg: str, cfg: DataConfig) -> MlxtuneError:
    req, opt = FORMAT_FIELDS[cfg.format]
    hint = f"format '{cfg.format}' needs fields {', '.join(req)}" + (f" (optional: {', '.join(opt)})" if opt else "")
    return MlxtuneError(f"{source}: record {row}: {msg}; {hint}; map differently named columns with data.columns")


def record_to_messages(rec: dict[str, Any], cfg: DataConfig, source: str = "<data>", row: int = 0) -> list[dict[str, str]]:
    """The conversation a record stands for; the final assistant turn is the response."""
    # cefr_words rows arrive here already grouped into cefr_list records (see build_dataset)
    fmt = "cefr_list" if cfg.format == "cefr_words" else cfg.format
    req, _ = FORMAT_FIELDS[fmt]
    missing = [k for k in req if rec.get(k) in (None, "")]
    if missing:
        raise _field_error(source, row, f"missing field(s) {', '.join(missing)} (has: {', '.join(sorted(rec)) or 'nothing'})", cfg)
    if fmt == "chat":
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in msgs):
            raise _field_error(source, row, "'messages' must be a list of {role, content} with role in system/user/assistant", cfg)
        if not any(m["role"] == "assistant" for m in msgs):
            raise _field_error(source, row, "the conversation has no assistant message to train on", cfg)
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    strings = {k: rec[k] for k in req if k not in ("words", "sentences")}
    bad = [k for k, v in strings.items() if not isinstance(v, str)]
    if bad:
        raise _field_error(source, row, f"field(s) {', '.join(bad)} must be strings", cfg)
    if fmt == "prompt_completion":
        user, answer = rec["prompt"], rec["completion"]
    elif fmt == "alpaca":
        extra = rec.get("input") or ""
        user, answer = (rec["instruction"] + ("\n\n" + extra if extra else "")), rec["output"]
    elif fmt == "text":
        return [{"role": "text", "content": rec["text"]}]
    elif fmt == "translation":
        user = f"Translate the following {cfg.source_lang} text to {cfg.target_lang}.\n\n{rec['source']}"
        answer = rec["target"]
    elif fmt == "cefr_list":
        words, sents = rec["words"], rec["sentences"]
        if not (isinstance(words, list) and isinstance(sents, list) and len(words) == len(sents) and words
                and all(isinstance(x, str) for x in words + sents)):
            raise _field_error(source, row, "'words' and 'sentences' must be non-empty lists of strings of the same length", cfg)
        user = cefr_prompt(rec["level"], words)
        answer = "\n".join(f"{i}. {s}" for i, s in enumerate(sents, 1))
    elif fmt == "code":
        if any(rec.get(k) is not None and not isinstance(rec[k], str) for k in ("test", "entry_point")):
            raise _field_error(source, row, "'test' and 'entry_point' must be strings", cfg)
        if rec.get("entry_point") and not rec["entry_point"].isidentifier():
            raise _field_error(source, row, f"'entry_point' must be a Python function name, got {rec['entry_point']!r}", cfg)
        user = rec["problem"]
        answer = f"```python\n{rec['solution'].rstrip()}\n```"
    else:  # pragma: no cover - the recipe's Literal type rules this out
        raise AssertionError(fmt)
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def cefr_prompt(level: str, words: list[str]) -> str:
    """The list-format instruction of the CEFR experiments (N words -> N numbered sentences)."""
    listed = "\n".join(f"{i}. {w}" for i, w in enumerate(words, 1))
    return (
        f"Generate {level}-level English sentences for these {len(words)} words:\n{listed}\n\n"
        f"Provide numbered sentences (1-{len(words)}), using each word naturally and appropriately for {level} level."
    )


# ------------------------------------------------------------------ messages -> text segments


def render_segments(messages: list[dict[str, str]], template: str, tokenizer: Any, system_prompt: str = "",
                    add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """Rendered text as (text, trained) segments; trained segments are assistant responses.

    With ``add_generation_prompt`` the trailing assistant turn is left out and the prompt for
    it is rendered instead: that is exactly the prefix the model saw in training.
    """
    if messages and messages[0]["role"] == "text":
        return [(messages[0]["content"] + _eos_text(tokenizer), True)]
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    if add_generation_prompt:
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
    if template == "chat":
        return _chat_segments(messages, tokenizer, add_generation_prompt)
    segments: list[tuple[str, bool]] = []
    system = ""
    for m in messages:
        if m["role"] == "system":
            system = m["content"]
        elif m["role"] == "user":
            segments.append((_wrap_prompt(template, m["content"], system), False))
            system = ""
        else:
            segments.append((m["content"] + _eos_text(tokenizer), True))
    return segments


def _wrap_prompt(template: str, prompt: str, system: str) -> str:
    head = f"{system}\n\n" if system else ""
    if template == "alpaca":
        return f"{head}### Instruction:\n{prompt}\n\n### Response:\n"
    if template == "plain":
        return f"{head}{prompt}\n"
    if "{system}" in template:  # the recipe's own template places the system message itself
        return template.replace("{system}", system).replace("{prompt}", prompt)
    return head + template.replace("{prompt}", prompt)


def _eos_text(tokenizer: Any) -> str:
    return tokenizer.eos_token or ""


def _chat_segments(messages: list[dict[str, str]], tokenizer: Any, add_generation_prompt: bool) -> list[tuple[str, bool]]:
    if not getattr(tokenizer, "chat_template", None):
        raise MlxtuneError('the model\'s tokenizer has no chat template: set data.template = "alpaca", "plain" or your own string with {prompt}')

    def render(msgs: list[dict[str, str]], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(messages[:i], True)
        full = render(messages[: i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise MlxtuneError("the chat template does not render conversations as growing prefixes, so response tokens cannot be located; use data.template = \"alpaca\" or \"plain\"")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    tail = render(messages, add_generation_prompt)
    if not tail.startswith(done):
        raise MlxtuneError("the chat template does not render conversations as growing prefixes; use data.template = \"alpaca\" or \"plain\"")
    if tail[len(done):]:
        segments.append((tail[len(done):], False))
    return segments


# ------------------------------------------------------------------ text -> ids + mask


def _adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def tokenize_segments(segments: list[tuple[str, bool]], tokenizer: Any, cfg: DataConfig) -> Example:
    """Each segment is tokenized on its own so that a prompt's ids are the same whether or not
    a response follows it (generation sees exactly the training prefix). Chat templates write
    their own BOS; other templates and plain text get the tokenizer's BOS if it uses one."""
    ids: list[int] = []
    mask: list[bool] = []
    if (cfg.template != "chat" or cfg.format == "text") and _adds_bos(tokenizer):
        ids.append(tokenizer.bos_token_id)
        mask.append(False)
    for text, trained in segments:
        if not text:
            continue
        seg = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += seg
        mask += [trained] * len(seg)
    if mask:
        mask[0] = False  # the first token is never a target: nothing precedes it
    return Example(np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool))


def encode_messages(msgs: list[dict[str, str]], cfg: DataConfig, tokenizer: Any) -> Example:
    return tokenize_segments(render_segments(msgs, cfg.template, tokenizer, cfg.system_prompt), tokenizer, cfg)


def encode_prompt(rec: dict[str, Any], cfg: DataConfig, tokenizer: Any) -> np.ndarray:
    """Token ids of the generation prompt for a record: the training prefix of its response."""
    msgs = record_to_messages(rec, cfg)
    segs = render_segments(msgs, cfg.template, tokenizer, cfg.system_prompt, add_generation_prompt=True)
    return tokenize_segments(segs, tokenizer, cfg).tokens


def encode_records(convs: list[list[dict[str, str]]], cfg: DataConfig, tokenizer: Any, source: str) -> tuple[list[Example], DataStats]:
    """Tokenize conversations and apply ``cfg.overlong``; nothing is cut or dropped without being counted."""
    stats = DataStats(records=len(convs))
    out: list[Example] = []
    longest = 0
    for i, msgs in enumerate(convs):
        ex = encode_messages(msgs, cfg, tokenizer)
        if len(ex) > cfg.max_seq_len:
            stats.overlong += 1
            longest = max(longest, len(ex))
            if cfg.overlong == "drop":
                stats.dropped += 1
                continue
            if cfg.overlong == "truncate":
                ex = Example(ex.tokens[: cfg.max_seq_len], ex.loss_mask[: cfg.max_seq_len])
                stats.truncated += 1
                if not ex.loss_mask.any() and cfg.loss_on == "response":
                    stats.dropped += 1  # its whole response was cut off
                    continue
        out.append(ex)
        stats.lengths.append(len(ex))
        stats.kept_rows.append(i)
    if stats.overlong and cfg.overlong == "error":
        raise MlxtuneError(
            f"{source}: {stats.overlong} of {stats.records} examples are longer than data.max_seq_len = {cfg.max_seq_len} "
            f"tokens (longest: {longest}); raise data.max_seq_len, or set data.overlong = \"drop\" or \"truncate\""
        )
    if not out:
        raise MlxtuneError(f"{source}: no example left after applying data.overlong = \"{cfg.overlong}\" ({stats.overlong} over {cfg.max_seq_len} tokens); raise data.max_seq_len")
    stats.kept = len(out)
    return out, stats


# ------------------------------------------------------------------ split


@dataclass
class Dataset:
    """Tokenized splits; ``*_records[i]`` is the record of ``train[i]`` / ``eval[i]``."""

    train: list[Example]
    eval: list[Example]
    train_records: list[dict[str, Any]]
    eval_records: list[dict[str, Any]]
    stats: dict[str, DataStats]


def split_records(records: list[Any], cfg: DataConfig) -> tuple[list[Any], list[Any]]:
    """Seeded shuffle, optional cap, then the first ``eval_fraction`` goes to eval."""
    order = np.random.default_rng(cfg.split_seed).permutation(len(records))
    shuffled = [records[i] for i in order]
    if cfg.max_examples:
        shuffled = shuffled[: cfg.max_examples]
    if cfg.eval:
        return shuffled, []
    n_eval = max(1, round(len(shuffled) * cfg.eval_fraction))
    if n_eval >= len(shuffled):
        raise MlxtuneError(f"{cfg.train}: {len(shuffled)} records are too few to hold out {n_eval} for eval; add data or set data.eval")
    return shuffled[n_eval:], shuffled[:n_eval]


def build_dataset(recipe: Recipe, tokenizer: Any) -> Dataset:
    cfg = recipe.data
    train_src = recipe.resolve_path(cfg.train)
    where = str(recipe.source or "<recipe>")

    def read(src: str, recs: list[dict[str, Any]] | None = None) -> list[tuple[dict[str, Any], list[dict[str, str]]]]:
        # checked in file order, before the shuffle, so an error names the real row
        if recs is None:
            recs = load_records(src, cfg, where)
            if cfg.format == "cefr_words":
                recs = group_rows(recs, src, cfg.split_seed, cfg.cefr_level, cfg.cefr_records)
        return [(rec, record_to_messages(rec, cfg, src, row)) for row, rec in enumerate(recs, 1)]

    if cfg.format == "cefr_words" and not cfg.eval:
        # split on WORDS, then group each side: no eval word or sentence is ever trained on
        train_recs, eval_recs = split_and_group(load_records(train_src, cfg, where), train_src, cfg.split_seed,
                                                cfg.eval_fraction, cfg.cefr_level, cfg.cefr_records)
        train_pairs, eval_pairs = read(train_src, train_recs[: cfg.max_examples or None]), read(train_src, eval_recs)
    else:
        train_pairs, eval_pairs = split_records(read(train_src), cfg)
    eval_src = train_src
    if cfg.eval:
        eval_src = recipe.resolve_path(cfg.eval)
        eval_pairs = read(eval_src)
    if cfg.max_eval_examples:
        eval_pairs = eval_pairs[: cfg.max_eval_examples]
    train, train_stats = encode_records([m for _, m in train_pairs], cfg, tokenizer, train_src)
    evals, eval_stats = encode_records([m for _, m in eval_pairs], cfg, tokenizer, eval_src)
    if cfg.loss_on == "full":
        for ex in train:
            ex.loss_mask = full_mask(len(ex))
    return Dataset(train, evals, [train_pairs[i][0] for i in train_stats.kept_rows],
                   [eval_pairs[i][0] for i in eval_stats.kept_rows], {"train": train_stats, "eval": eval_stats})


def full_mask(n: int) -> np.ndarray:
    m = np.ones(n, dtype=bool)
    m[:1] = False
    return m
