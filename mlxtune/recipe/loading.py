"""Recipe files -> the typed :class:`~mlxtune.recipe.schema.Recipe`: TOML, `--set` overrides,
type checks that name the key and the allowed values, and the generated key reference."""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from mlxtune.errors import MlxtuneError
from mlxtune.recipe.schema import SECTIONS, AdapterConfig, Recipe, METHOD_KEYS

SET_HELP = "Override a recipe key, e.g. --set train.lr=1e-4 (repeatable; values are read as TOML)."


# ---------------------------------------------------------------- type checking


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        item = typing.get_args(tp)[0]
        return "a list of " + {str: "strings", int: "integers", float: "numbers"}.get(item, _type_name(item))
    if origin is dict:
        return "a table of strings"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(tp, str(tp))


def _check(value: Any, tp: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits annotation ``tp``; returns the (possibly widened) value."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp), value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _check(value, arg)
            if ok:
                return True, v
        return False, value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        (item_tp,) = typing.get_args(tp)
        items = []
        for item in value:
            ok, v = _check(item, item_tp)
            if not ok:
                return False, value
            items.append(v)
        return True, items
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(v, str) for v in value.values()), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    raise TypeError(f"unsupported annotation {tp!r}")


def _field_errors(cls: type, table: dict[str, Any], prefix: str) -> tuple[dict[str, Any], list[str]]:
    """The typed keyword arguments of section ``cls``, and every unknown key, wrong type,
    non-finite number and missing required key (all of them, not only the first)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs, errors = {}, []
    for key, value in table.items():
        if key not in fields:
            errors.append(f"unknown key '{prefix}{key}'; allowed keys: {', '.join(sorted(fields))}")
            continue
        if dataclasses.is_dataclass(hints[key]):
            errors.append(f"'{prefix}{key}' must be a [{key}] table, not a value")
            continue
        ok, value = _check(value, hints[key])
        if not ok:
            errors.append(f"'{prefix}{key}' = {value!r} is not {_type_name(hints[key])}")
        elif bad := _non_finite(value):
            errors.append(f"'{prefix}{key}' = {bad} is not a finite number; give a number such as {_default(fields[key])!r}")
        else:
            kwargs[key] = value
    for name, f in fields.items():
        if f.metadata.get("required") and name not in table:
            errors.append(f"missing required key '{prefix}{name}' ({f.metadata['doc']})")
    return kwargs, errors


def _non_finite(value: Any) -> str | None:
    """'nan' / 'inf' when a number (or a number in a list) is not finite: TOML reads `nan` and
    `inf`, and no recipe number means anything when it is one of them."""
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, float) and not math.isfinite(v):
            return repr(v)
    return None


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]


def _raise(where: str, errors: list[str]) -> None:
    """One line for every problem found (numbered when there are several)."""
    if len(errors) == 1:
        raise MlxtuneError(f"{where}: {errors[0]}")
    if errors:
        raise MlxtuneError(f"{where}: {len(errors)} problems: " + " ".join(f"({i}) {e}" for i, e in enumerate(errors, 1)))


def _check_method_keys(adapter: AdapterConfig, table: dict[str, Any], where: str) -> None:
    """Refuse adapter keys the TOML (or --set) gives that the chosen method does not use. A key
    written with its default value passes, so a recipe.resolved.toml (every key written) loads."""
    applies = METHOD_KEYS.get(adapter.method, ())
    defaults = {f.name: f for f in dataclasses.fields(AdapterConfig)}
    foreign = sorted({k for keys in METHOD_KEYS.values() for k in keys} - set(applies))
    bad = []
    for key in foreign:
        if key in table:
            if getattr(adapter, key) != _default(defaults[key]):
                bad.append(key)
    if bad:
        raise MlxtuneError(
            f"{where}: adapter.{', adapter.'.join(bad)} do{'es' if len(bad) == 1 else ''} not apply to adapter.method = "
            f"\"{adapter.method}\"; its options are: {', '.join(applies)} (remove the others)"
        )


def recipe_from_dict(raw: dict[str, Any], where: str = "<recipe>", source: Path | None = None,
                     planning: bool = False) -> Recipe:
    """The typed recipe. ``planning`` accepts what only `mlxtune plan` can use yet (methods and
    quantization that training does not support)."""
    top = {k: v for k, v in raw.items() if k not in SECTIONS}
    errors: list[str] = []
    for key in top:
        if key not in ("backend",):
            errors.append(f"unknown key '{key}'; allowed top-level keys: backend, " + ", ".join(f"[{s}]" for s in SECTIONS))
    hints = typing.get_type_hints(Recipe)
    if "backend" in top and not _check(top["backend"], hints["backend"])[0]:
        errors.append(f"'backend' = {top['backend']!r} is not {_type_name(hints['backend'])}")
    sections = {}
    for name, cls in SECTIONS.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            errors.append(f"'{name}' must be a [{name}] table")
            continue
        kwargs, found = _field_errors(cls, table, f"{name}.")
        errors += found
        if not found:  # the section's own checks (ranges, combinations) once its types are right
            try:
                sections[name] = cls(**kwargs)
            except ValueError as e:
                errors.append(str(e))
    _raise(where, errors)
    _check_method_keys(sections["adapter"], raw.get("adapter", {}), where)
    try:
        recipe = Recipe(**top, **sections, source=source)
        if not planning:
            recipe.check_trainable()
    except ValueError as e:
        raise MlxtuneError(f"{where}: {e}") from None
    return recipe


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], value); the value is read as TOML, else a string."""
    if "=" not in text:
        raise MlxtuneError(f"--set {text!r}: expected section.key=value, e.g. --set train.lr=1e-4")
    key, raw_value = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise MlxtuneError(f"--set {text!r}: expected section.key=value, e.g. --set train.lr=1e-4")
    try:
        value = tomllib.loads(f"v = {raw_value}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw_value
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise MlxtuneError(f"--set {text!r}: '{part}' is a value, not a section")
        node[parts[-1]] = value
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None, planning: bool = False) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise MlxtuneError(f"recipe file not found: {path} (give the path to a .toml recipe, e.g. recipes/quickstart.toml)")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a BOM (some Windows editors write one) is not an error
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise MlxtuneError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); "
                           "save the recipe as UTF-8") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise MlxtuneError(f"{path}: TOML syntax error: {e}") from None
    raw = apply_overrides(raw, overrides or [])
    where = str(path) + (" (with --set overrides)" if overrides else "")
    return recipe_from_dict(raw, where=where, source=path.resolve(), planning=planning)


def reference_markdown() -> str:
    """The recipe reference, generated from the field docs (README embeds this)."""
    lines = []
    top = [f for f in dataclasses.fields(Recipe) if f.name == "backend"]
    groups = [("top level", Recipe, top)] + [
        (f"[{name}]", cls, list(dataclasses.fields(cls))) for name, cls in SECTIONS.items()
    ]
    for title, cls, fields in groups:
        hints = typing.get_type_hints(cls)
        lines += [f"**{title}**", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in fields:
            if f.metadata.get("required"):
                default = "required"
            else:
                value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
                default = f"`{json.dumps(value)}`"  # also valid TOML for these values
            tp = _type_name(hints[f.name]).replace("|", "\\|")
            lines.append(f"| `{f.name}` | {tp} | {default} | {f.metadata['doc']} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
