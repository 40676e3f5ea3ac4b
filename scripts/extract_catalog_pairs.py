#!/usr/bin/env python3
"""Extract English -> Turkish sentence pairs from the Turkish message catalogs of Django and Sphinx.

Dev-time script: it needs Django and Sphinx *installed* (it only reads their files and never
imports them), the committed data does not. Django (BSD-3-Clause) ships one catalog per app
(``django/conf/locale/tr`` and ``django/contrib/*/locale/tr``); Sphinx (BSD-2-Clause) one for the
whole tool. Every ``locale/tr/LC_MESSAGES/*.po`` file of both packages is read with a small
stdlib .po parser, and an entry is kept when it is

- translated, not fuzzy, not obsolete (``#~``), without plural forms;
- free of placeholders (``%s``, ``%(name)s``, ``%d``, ``{0}``, ``{name}``, ...) in source and target,
  and not flagged ``python-format`` / ``python-brace-format`` / ``javascript-format``;
- free of markup: HTML tags or entities, URLs, e-mail addresses, reST roles, backticks, ``**``,
  newlines or tabs in the message (usage text, not a sentence);
- an English source of at least ``--min-words`` words (default 5) whose target/source length
  ratio (characters) lies in [``--min-ratio``, ``--max-ratio``];
- new: pairs are deduplicated on the case-folded source (first catalog in sorted order wins),
  and dropped when the target is identical to the source or still holds English function words
  ("the", "to", "of", ...: a partly untranslated string).

Whitespace is normalised (runs of spaces collapsed, ends stripped). Each kept pair is written as
``{"source", "target", "provenance"}`` (mlxtune's ``translation`` format ignores extra fields;
``provenance`` is ``package version:catalog path``), in a fixed order, so the output depends only
on the installed packages. The counts each filter removed, per package, are printed and written
to ``catalogs.stats.json`` next to the data, with the package versions.

Usage (from anywhere; without touching the main environment)::

    pip install --no-deps --target /tmp/catpkgs django==5.2.19 sphinx==9.0.4
    PYTHONPATH=/tmp/catpkgs python scripts/extract_catalog_pairs.py

It also copies the packages' license files to ``data/en_tr/LICENSE.django`` and
``data/en_tr/LICENSE.sphinx``.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "data" / "en_tr"
PACKAGES = ("django", "sphinx")
LICENSE_FILES = {"django": "LICENSE", "sphinx": "LICENSE.rst"}  # in the dist-info's licenses/ folder

# filter names in the order they are applied; the first one that matches removes the entry
FILTERS = ("untranslated", "fuzzy", "plural", "placeholder", "markup", "short", "ratio", "same_as_source",
           "english_in_target", "duplicate")

_PLACEHOLDER = re.compile(
    r"%(\([^)]*\))?[-#0 +]*(\*|\d+)?(\.(\*|\d+))?[hlL]?[diouxXeEfFgGcrsab%]"  # printf style, with %% as well
    r"|\{[^{}]*\}"  # str.format / brace style, {0} {name} {}
    r"|\$\{?\w+"  # shell / template style
)
_MARKUP = re.compile(
    r"<[^>]+>|&[a-zA-Z]+;|&#\d+;"  # HTML tags and entities
    r"|https?://|www\.|\w+@\w+\.\w+"  # URLs and e-mail addresses
    r"|:[a-z]+:|`|\*\*|\n|\t|\\"  # reST roles, literals, bold; multi-line usage text
)
# English function words never written in Turkish: a target with one is partly untranslated
_ENGLISH = re.compile(r"\b(the|to|of|and|is|are|for|with|when|used)\b")
_FORMAT_FLAGS = {"python-format", "python-brace-format", "c-format", "javascript-format"}
_ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\", "r": "\r"}


@dataclass
class Entry:
    msgid: str = ""
    msgid_plural: str | None = None
    msgstr: dict[int, str] = field(default_factory=dict)
    msgctxt: str | None = None
    flags: set[str] = field(default_factory=set)
    obsolete: bool = False


def _unquote(text: str, where: str) -> str:
    text = text.strip()
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        raise ValueError(f"{where}: expected a quoted string, got {text[:40]!r}")
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), text[1:-1])


def parse_po(path: Path) -> list[Entry]:
    """Entries of a .po file (the header entry with an empty msgid is left out)."""
    entries: list[Entry] = []
    cur = Entry()
    key: tuple[str, int] | None = None  # which string a continuation line extends
    started = False

    def flush() -> None:
        nonlocal cur, key, started
        if started and cur.msgid:
            entries.append(cur)
        cur, key, started = Entry(), None, False

    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        where = f"{path}:{n}"
        line = raw.strip()
        obsolete = line.startswith("#~")
        if obsolete:
            line = line[2:].strip()
            if line.startswith("|"):
                continue  # previous msgid of an obsolete entry
        if not line:
            flush()
            continue
        if line.startswith("#"):
            if line.startswith("#,"):
                if started and key is not None and key[0] == "msgstr":
                    flush()  # a flags comment starts the next entry
                cur.flags.update(f.strip() for f in line[2:].split(","))
            continue
        if line.startswith('"'):
            if key is None:
                raise ValueError(f"{where}: string continuation outside an entry")
            value = _unquote(line, where)
            if key[0] == "msgstr":
                cur.msgstr[key[1]] += value
            else:
                setattr(cur, key[0], getattr(cur, key[0]) + value)
            continue
        word, _, rest = line.partition(" ")
        m = re.fullmatch(r"msgstr\[(\d+)\]", word)
        if word in ("msgctxt", "msgid") and started and key is not None and key[0] == "msgstr":
            flush()  # a new entry without a blank line in between
        if word in ("msgctxt", "msgid", "msgid_plural"):
            started = True
            setattr(cur, word, _unquote(rest, where))
            key = (word, 0)
        elif word == "msgstr" or m:
            idx = int(m.group(1)) if m else 0
            cur.msgstr[idx] = _unquote(rest, where)
            key = ("msgstr", idx)
        else:
            raise ValueError(f"{where}: unexpected line {raw[:60]!r}")
        cur.obsolete = cur.obsolete or obsolete
    flush()
    return entries


def _words(text: str) -> int:
    """Whitespace-separated words that contain a letter ("date/time" is one word, "-" none)."""
    return sum(1 for w in text.split() if re.search(r"[^\W\d_]", w))


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def reject_reason(e: Entry, min_words: int, min_ratio: float, max_ratio: float) -> str | None:
    """The first filter (see FILTERS) that removes an entry, or None to keep it."""
    if e.obsolete or not any(e.msgstr.values()):
        return "untranslated"
    if "fuzzy" in e.flags:
        return "fuzzy"
    if e.msgid_plural is not None or len(e.msgstr) > 1:
        return "plural"
    src, tgt = e.msgid, e.msgstr.get(0, "")
    if e.flags & _FORMAT_FLAGS or _PLACEHOLDER.search(src) or _PLACEHOLDER.search(tgt):
        return "placeholder"
    if _MARKUP.search(src) or _MARKUP.search(tgt):
        return "markup"
    src, tgt = normalise(src), normalise(tgt)
    if _words(src) < min_words:
        return "short"
    if not (min_ratio <= len(tgt) / len(src) <= max_ratio):
        return "ratio"
    if tgt.casefold() == src.casefold():
        return "same_as_source"
    if _ENGLISH.search(tgt):
        return "english_in_target"
    return None


def package_root(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # locates the package without running its code
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"{name} is not installed; pip install --no-deps --target /tmp/catpkgs {name} and set PYTHONPATH=/tmp/catpkgs")
    return Path(next(iter(spec.submodule_search_locations)))


def license_text(name: str) -> str:
    dist = md.distribution(name)
    wanted = LICENSE_FILES[name]
    for f in dist.files or []:
        if f.name == wanted and "dist-info" in str(f):
            return f.read_text(encoding="utf-8")
    sys.exit(f"{name}: no {wanted} in its dist-info")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT_DIR / "catalogs.jsonl")
    ap.add_argument("--min-words", type=int, default=5)
    ap.add_argument("--min-ratio", type=float, default=0.6)
    ap.add_argument("--max-ratio", type=float, default=1.8)
    args = ap.parse_args(argv)

    pairs: list[dict[str, str]] = []
    seen: set[str] = set()
    stats: dict[str, object] = {"filters_in_order": list(FILTERS), "min_words": args.min_words,
                                "ratio_range": [args.min_ratio, args.max_ratio], "packages": {}}
    for name in PACKAGES:
        root = package_root(name)
        version = md.version(name)
        counts: Counter[str] = Counter()
        catalogs = sorted(root.rglob("locale/tr/LC_MESSAGES/*.po"))
        if not catalogs:
            sys.exit(f"{name} {version}: no Turkish catalogs under {root}")
        for po in catalogs:
            rel = po.relative_to(root.parent).as_posix()
            for e in parse_po(po):
                counts["entries"] += 1
                reason = reject_reason(e, args.min_words, args.min_ratio, args.max_ratio)
                src, tgt = normalise(e.msgid), normalise(e.msgstr.get(0, ""))
                if reason is None and src.casefold() in seen:
                    reason = "duplicate"
                if reason:
                    counts[reason] += 1
                    continue
                seen.add(src.casefold())
                counts["kept"] += 1
                pairs.append({"source": src, "target": tgt, "provenance": f"{name} {version}:{rel}"})
        stats["packages"][name] = {"version": version, "catalogs": len(catalogs),  # type: ignore[index]
                                   **{k: counts[k] for k in ("entries", *FILTERS, "kept")}}
        print(f"{name} {version}: {len(catalogs)} catalogs, {counts['entries']} entries; removed: "
              + ", ".join(f"{k} {counts[k]}" for k in FILTERS) + f"; kept {counts['kept']}")
        (args.out.parent / f"LICENSE.{name}").write_text(license_text(name), encoding="utf-8")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    stats["pairs"] = len(pairs)
    (args.out.parent / "catalogs.stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {len(pairs)} pairs to {args.out}")


if __name__ == "__main__":
    main()
