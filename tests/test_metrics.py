"""avcap.metrics on small hand-checked cases, and the Java-free path against pycocoevalcap's Java tokenizer."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from avcap.metrics import format_scores, ptb_tokenize, ptb_tokenize_line, score_captions, write_coco_results
from tests.skip_policy import skip_without

# Java is installed by scripts/setup.sh: the tests that need it fail without it rather than skip.


def test_bleu_by_hand():
    # pred: a cat sat on the mat (6)   ref: the cat is on the mat (6)
    # clipped unigram matches: cat, on, the, mat = 4/6; bigram matches: on-the, the-mat = 2/5; BP = 1
    s = score_captions({"k": "A cat sat on the mat."}, {"k": ["The cat is on the mat"]}, use_java=False)
    assert s["Bleu_1"] == pytest.approx(4 / 6, abs=1e-6)
    assert s["Bleu_2"] == pytest.approx(math.sqrt(4 / 6 * 2 / 5), abs=1e-6)
    # ROUGE-L: LCS "cat on the mat" = 4, P = R = 4/6, beta 1.2 -> F = 4/6
    assert s["ROUGE_L"] == pytest.approx(4 / 6, abs=1e-6)
    # brevity penalty: 2 words against 6: exp(1 - 6/2)
    s = score_captions({"k": "the cat"}, {"k": ["the cat is on the mat"]}, use_java=False)
    assert s["Bleu_1"] == pytest.approx(math.exp(-2), abs=1e-6)


def test_identical_captions_score_perfectly():
    refs = {"a": ["a dog barks at a passing car"], "b": ["rain falls on a metal roof"],
            "c": ["a man speaks while birds chirp"]}
    preds = {k: v[0] for k, v in refs.items()}
    s = score_captions(preds, refs, use_java=False)
    for n in range(1, 5):
        assert s[f"Bleu_{n}"] == pytest.approx(1.0, abs=1e-6)
    assert s["ROUGE_L"] == pytest.approx(1.0)
    assert s["CIDEr"] == pytest.approx(10.0, abs=1e-6)   # CIDEr-D: cosine 1, no length penalty, x10
    assert s["num_clips"] == 3


def test_java_free_path_reports_java_metrics_unavailable():
    why: dict[str, str] = {}
    s = score_captions({"k": "a dog"}, {"k": ["a dog barks"]}, use_java=False, unavailable=why)
    assert s["METEOR"] is None and s["SPICE"] is None and s["SPIDEr"] is None
    assert set(why) == {"METEOR", "SPICE", "SPIDEr"}
    assert "METEOR unavailable" in format_scores(s) and "SPICE unavailable" in format_scores(s)


def test_python_ptb_tokenizer_matches_stanford_conventions():
    assert ptb_tokenize_line("Don't stop (it's Mr. Smith's dog)!") == \
        ["do", "n't", "stop", "-lrb-", "it", "'s", "mr.", "smith", "'s", "dog", "-rrb-", "!"]
    assert ptb_tokenize_line('He said "hello" -- then left...') == \
        ["he", "said", "``", "hello", "''", "--", "then", "left", "..."]
    assert ptb_tokenize({"k": ["A dog barks; a cat can't, at 5:30 p.m."]}) == \
        {"k": ["a dog barks a cat ca n't at 5:30 p.m."]}
    assert ptb_tokenize({"k": ["Men in their 30s, 50% of the time, well-known and/or"]}) == \
        {"k": ["men in their 30s 50 % of the time well-known and/or"]}


def test_java_and_python_paths_agree(tmp_path):
    refs = {"a": ["A dog barks, then a car passes by.", "Dogs bark (loudly) as cars pass"],
            "b": ["It's raining; water drips on a roof!", "Rain falls on a roof while wind blows"],
            "c": ["A man's voice and birds' chirps", "Birds chirp and a man talks -- briefly"],
            "d": ["Someone can't stop laughing...", "People laugh and talk in the '90s style"]}
    preds = {"a": "A dog barks as cars pass by.", "b": "Rain is falling on a roof, it's windy",
             "c": "A man talks while birds chirp", "d": "People don't stop laughing"}
    why: dict[str, str] = {}
    # one Java run (METEOR starts a JVM with its paraphrase table): also checks SPICE without jars
    java = score_captions(preds, refs, use_java=True, spice_jars=str(tmp_path), unavailable=why)
    python = score_captions(preds, refs, use_java=False)
    for name in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert java[name] == pytest.approx(python[name], abs=1e-12), name
    assert 0.2 < java["METEOR"] < 1
    assert java["SPICE"] is None and java["SPIDEr"] is None
    assert "stanford-corenlp-3.6.0.jar" in why["SPICE"]


def test_spice_with_user_supplied_jars():
    """SPICE and SPIDEr when the user brings the CoreNLP jars (the one metric no registry can install)."""
    jars = os.environ.get("AVCAP_SPICE_JARS", "")
    names = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
    if not jars or not all((Path(jars) / n).is_file() for n in names):
        skip_without("stanford-corenlp-3.6.0", f"AVCAP_SPICE_JARS={jars!r} does not hold {', '.join(names)}")
    refs = {"a": ["a dog barks loudly", "a dog is barking"], "b": ["rain falls on a roof", "rain on a metal roof"]}
    preds = {"a": "a dog barks", "b": "rain falls on a roof"}
    why: dict[str, str] = {}
    s = score_captions(preds, refs, use_java=True, spice_jars=jars, unavailable=why)
    assert "SPICE" not in why and 0 < s["SPICE"] <= 1
    assert s["SPIDEr"] == pytest.approx((s["CIDEr"] + s["SPICE"]) / 2)


def test_results_file_and_bad_inputs(tmp_path):
    path = write_coco_results(tmp_path / "out" / "results.json", {"b": "second", "a": "first"})
    assert json.loads(path.read_text()) == [{"image_id": "a", "caption": "first"},
                                            {"image_id": "b", "caption": "second"}]
    with pytest.raises(ValueError, match="no references.*'x'"):
        score_captions({"x": "a dog"}, {"k": ["a dog"]}, use_java=False)
    with pytest.raises(ValueError, match="references for 'k' must be a non-empty list"):
        score_captions({"k": "a dog"}, {"k": "a dog"}, use_java=False)
    with pytest.raises(ValueError, match="no predictions"):
        score_captions({}, {"k": ["a dog"]}, use_java=False)


@pytest.mark.parametrize("java", [False, True])
def test_per_clip_cider_d_averages_to_the_split_cider_d(java):
    """cider_d_per_clip: pycocoevalcap's per-image CIDEr-D, tokenized like score_captions (either path), so their
    mean is the split's CIDEr-D; a clip that matches its references outscores one that does not."""
    from avcap.metrics import cider_d_per_clip
    refs = {"a": ["a dog barks loudly", "the dog is barking"], "b": ["rain falls on a roof", "heavy rain"],
            "c": ["a car engine revs up", "an engine is running"], "d": ["people talk and laugh", "a crowd talks"]}
    preds = {"a": "a dog barks loudly", "b": "music plays", "c": "an engine revs", "d": "people talking"}
    per_clip = cider_d_per_clip(preds, refs, use_java=java)
    assert sorted(per_clip) == sorted(preds)
    split = score_captions(preds, refs, use_java=java)["CIDEr"]
    assert sum(per_clip.values()) / len(per_clip) == pytest.approx(split, abs=1e-12)
    assert per_clip["a"] > per_clip["c"] > per_clip["b"] == 0.0
