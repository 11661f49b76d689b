"""Downstream evaluation: clean tasks (no text from the corpus's train splits), end-task fine-tuning of stage
checkpoints (`jaxcl.downstream`), the downstream matrix and `jaxcl downstream`."""

from __future__ import annotations

import numpy as np
import pytest

from jaxcl.data.classification import load_task, shipped_manifest
from jaxcl.data.corpus import DOMAINS, load_text
from jaxcl.data.overlap import SpanIndex, contained, normalize

DOMAIN_TASKS = {"bible": "bible_books", "wordnet": "wordnet_pos", "manpages": "manpage_section",
                "pydoc": "pydoc_package"}


# ----------------------------------------------------------------------------- clean tasks
def test_span_index_finds_exactly_the_shared_windows():
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    reference = [" ".join(rng.choice(words, 400)) for _ in range(3)]
    copied = "prefix words " + reference[1][500:530] + " suffix"           # a 30-character span of document 1
    near = reference[2][100:129] + "!"                                    # 29 shared, then a change
    texts = [copied, near, "completely different text here, long enough", "", "short"]
    index = SpanIndex(reference, span=30)
    brute = [any(normalize(t)[i:i + 30] in r for r in reference for i in range(len(normalize(t)) - 29))
             for t in texts]
    assert index.shared_spans(texts).tolist() == brute == [True, False, False, False, False]
    assert index.first_shared(copied) == reference[1][500:530]
    assert index.first_shared(near) is None
    # whitespace is normalised on both sides; a window never spans two reference strings
    assert SpanIndex(["a  b\n\nc d"], span=5).shared_spans(["x a b c d"]).tolist() == [True]
    assert SpanIndex(["abcde", "fghij"], span=6).shared_spans(["abcdef", "efghij"]).tolist() == [False, False]
    assert contained(["b c", "b  d"], "a b\nc d").tolist() == [True, False]
    with pytest.raises(ValueError, match="span"):
        SpanIndex(["x"], span=0)


def test_no_task_text_shares_an_80_character_span_with_any_corpus_train_split():
    """Issue 31: the four domain tasks are held out from pre-training. Every text of every split, against all
    five train splits; texts shorter than 80 characters must not occur whole in their domain's train split."""
    train = {d: load_text(d, "train") for d in DOMAINS}
    index = SpanIndex(train.values(), span=80)
    for domain, task in DOMAIN_TASKS.items():
        assert shipped_manifest()[task]["held_out_from_corpus_train"]["span_chars"] == 80
        for split in ("train", "valid", "test"):
            texts = load_task(task, split).texts
            hits = [t for t, hit in zip(texts, index.shared_spans(texts)) if hit]
            confirmed = [(t, index.first_shared(t)) for t in hits]
            confirmed = [c for c in confirmed if c[1] is not None]        # a 2^-64 hash collision is no overlap
            assert not confirmed, f"{task}.{split}: {len(confirmed)} texts share a span, e.g. {confirmed[0]}"
            short = [t for t in texts if len(normalize(t)) < 80]
            inside = [t for t, c in zip(short, contained(short, train[domain])) if c]
            assert not inside, f"{task}.{split}: {len(inside)} short texts occur in {domain}'s train split: {inside[:3]}"
