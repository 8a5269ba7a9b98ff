"""sparsert.data.corpus: offline English sentences, split by source, disjoint."""

from __future__ import annotations

import pytest

from sparsert.data import corpus


def _norm(s: str) -> str:
    """Case- and space-insensitive, as the corpus compares sentences (written out, not its own helper)."""
    return " ".join(s.lower().split())


@pytest.fixture(scope="module")
def splits():
    return {name: corpus.split(name) for name in corpus.SPLITS}


def test_the_sources_of_training_and_evaluation_do_not_overlap():
    train_sources = set(corpus.SPLITS["calibration"]) | set(corpus.SPLITS["train"])
    assert not train_sources & set(corpus.SPLITS["eval"])
    assert set(corpus.SPLITS["calibration"]) <= set(corpus.SPLITS["train"])


def test_eval_never_contains_a_training_sentence(splits):
    train = {_norm(s) for name in ("train", "calibration", "recovery") for s in splits[name]}
    assert not any(_norm(s) in train for s in splits["eval"])
    # the extra recovery text gives way to the evaluation *sources*: a recovery sentence that the
    # numpy/scipy/torch docs also carry can only have come from "train"
    held = {_norm(s) for src in corpus.SPLITS["eval"] for s in corpus.sentences(src)}
    from_train = {_norm(s) for s in splits["train"]}
    assert all(_norm(s) in from_train for s in splits["recovery"] if _norm(s) in held)
    for name, sents in splits.items():
        assert len({_norm(s) for s in sents}) == len(sents), f"{name} has duplicates"


def test_sizes_tens_of_thousands(splits):
    assert len(splits["calibration"]) >= 3000
    assert len(splits["train"]) >= 10_000
    assert len(splits["eval"]) >= 2000
    assert sum(len(v) for v in splits.values()) >= 20_000


def test_recovery_is_train_and_more(splits):
    assert corpus.SPLITS["recovery"][:len(corpus.SPLITS["train"])] == corpus.SPLITS["train"]
    recovery = {_norm(s) for s in splits["recovery"]}
    assert all(_norm(s) in recovery for s in splits["train"])
    if any(corpus.sentences(src) for src in corpus.SPLITS["recovery"] if src not in corpus.SPLITS["train"]):
        assert len(splits["recovery"]) > len(splits["train"])


def test_sentences_are_prose(splits):
    for s in splits["eval"][:500] + splits["train"][:500]:
        assert s[0].isupper() and s[-1] in ".!?"
        assert 6 <= len(s.split()) <= 60
        assert ">>>" not in s and "{" not in s and "=" not in s


def test_deterministic_and_cache_free_builds_agree():
    a = corpus.sentences("numpy")
    b = corpus.sentences("numpy", cache=False)
    assert a == b and len(a) > 500
    assert corpus.split("eval", 50, shuffled=True, seed=1) == corpus.split("eval", 50, shuffled=True, seed=1)
    assert corpus.split("eval", 50, shuffled=True, seed=1) != corpus.split("eval", 50, shuffled=True, seed=2)


def test_extract_sentences_skips_code_and_joins_abbreviations():
    text = ("Compute the thing for every item in the list. See e.g. Knuth for the proof of this claim.\n\n"
            ">>> x = f(3)\n>>> print(x)\n\n"
            "    indented literal block that is code\n\n"
            "Short one.")
    got = corpus.extract_sentences(text)
    assert got == ["Compute the thing for every item in the list.",
                   "See e.g. Knuth for the proof of this claim."]


def test_bad_arguments():
    with pytest.raises(ValueError):
        corpus.split("nope")
    with pytest.raises(ValueError):
        corpus.sentences("nope")
    with pytest.raises(ValueError):
        corpus.split("eval", 10**9)
