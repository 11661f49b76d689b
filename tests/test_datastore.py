"""Datastore: exact search vs NumPy on a mesh, persistence, crash safety (SIGKILL), bad input."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from jaxcl.memory import Datastore, DatastoreError
from tests.compile_cache import killable_env

ROOT = Path(__file__).resolve().parents[1]


def brute_force(keys, queries, k):
    d = ((keys.astype(np.float16).astype(np.float32)[None] - queries[:, None]) ** 2).sum(-1)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), order


@pytest.mark.parametrize("approx", [False, True])
def test_exact_backend_on_an_8_device_mesh_matches_numpy(tmp_path, approx):
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
    rng = np.random.default_rng(1)
    keys = rng.normal(size=(3001, 24)).astype(np.float32)      # not a multiple of the devices or chunks
    queries = rng.normal(size=(37, 24)).astype(np.float32)
    ds = Datastore.create(tmp_path / "s", dim=24, backend="exact", mesh=mesh,
                          index_options={"approx": approx, "chunk_rows": 128})
    ds.add(keys[:1000], rng.integers(0, 100, 1000))
    ds.add(keys[1000:], rng.integers(0, 100, 2001))
    dists, ids = ds.search(queries, 16)
    ref_d, ref_i = brute_force(keys, queries, 16)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(dists, ref_d, rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(dists, axis=1) >= 0)
    assert ds.values[ids].shape == (37, 16)


def test_reopen_keeps_everything_and_appends_after_the_last_row(tmp_path):
    rng = np.random.default_rng(2)
    keys, values = rng.normal(size=(700, 8)).astype(np.float32), rng.integers(0, 50, 700).astype(np.int32)
    ds = Datastore.create(tmp_path / "s", dim=8, model_fingerprint="abc", tokenizer="default")
    ds.add(keys[:500], values[:500])
    again = Datastore.open(tmp_path / "s", model_fingerprint="abc")
    assert len(again) == 500 and again.manifest["tokenizer"] == "default"
    np.testing.assert_array_equal(again.keys, keys[:500].astype(np.float16))
    again.add(keys[500:], values[500:])
    third = Datastore.open(tmp_path / "s")
    np.testing.assert_array_equal(third.values, values)
    np.testing.assert_array_equal(third.keys, keys.astype(np.float16))
    _, ids = third.search(keys[650:660], 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(650, 660))
    with pytest.raises(DatastoreError, match="not comparable"):
        Datastore.open(tmp_path / "s", model_fingerprint="other")
    with pytest.raises(FileExistsError, match="already holds a datastore"):
        Datastore.create(tmp_path / "s", dim=8)


def test_fewer_rows_than_k_returns_every_row(tmp_path):
    ds = Datastore.create(tmp_path / "s", dim=4)
    ds.add(np.eye(4, dtype=np.float32)[:3], np.array([5, 6, 7]))
    dists, ids = ds.search(np.zeros((2, 4), np.float32), 10)
    assert ids.shape == (2, 3)
    np.testing.assert_allclose(dists, 1.0)


def test_bad_input_raises_clear_errors_and_leaves_the_store_unchanged(tmp_path):
    ds = Datastore.create(tmp_path / "s", dim=8)
    rng = np.random.default_rng(3)
    good = rng.normal(size=(10, 8)).astype(np.float32)
    ds.add(good, np.arange(10))
    manifest = (tmp_path / "s" / "manifest.json").read_bytes()
    nan_keys = good.copy()
    nan_keys[3, 2] = np.nan
    with pytest.raises(ValueError, match=r"shape \[n, 8\]"):
        ds.add(rng.normal(size=(4, 7)), np.arange(4))
    with pytest.raises(ValueError, match="NaN"):
        ds.add(nan_keys, np.arange(10))
    with pytest.raises(TypeError, match="integer token ids"):
        ds.add(good, np.arange(10) + 0.5)
    with pytest.raises(ValueError, match="one per key"):
        ds.add(good, np.arange(9))
    with pytest.raises(ValueError, match=r"\[0, 2\*\*31\)"):
        ds.add(good, -np.arange(10))
    with pytest.raises(ValueError, match=r"shape \[q, 8\]"):
        ds.search(np.zeros((2, 5), np.float32), 3)
    assert (tmp_path / "s" / "manifest.json").read_bytes() == manifest
    reopened = Datastore.open(tmp_path / "s")
    assert len(reopened) == len(ds) == 10
    np.testing.assert_array_equal(reopened.keys, good.astype(np.float16))

    empty = Datastore.create(tmp_path / "empty", dim=8)
    with pytest.raises(ValueError, match="is empty"):
        empty.search(good, 4)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hello")
    with pytest.raises(DatastoreError, match="not a jaxcl datastore"):
        Datastore.open(tmp_path / "plain")
    (tmp_path / "plain" / "manifest.json").write_text(json.dumps({"something": "else"}))
    with pytest.raises(DatastoreError, match="not a jaxcl datastore"):
        Datastore.open(tmp_path / "plain")
    with pytest.raises(DatastoreError, match="not a jaxcl datastore"):
        Datastore.open(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown datastore backend"):
        Datastore.create(tmp_path / "b", dim=8, backend="faiss")
    assert not (tmp_path / "b").exists()


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from jaxcl.memory import Datastore
    path, rows = sys.argv[1], int(sys.argv[2])
    ds = Datastore.create(path, dim=32, chunk_rows=1024)
    for b in range(10_000):
        ids = np.arange(b * rows, (b + 1) * rows)
        keys = (np.sin(ids[:, None] * 0.001 + np.arange(32)[None]) * 8).astype(np.float32)
        ds.add(keys, ids % 8192)
        print("committed", len(ds), flush=True)
""")


def test_sigkill_mid_append_keeps_the_last_commit_intact(tmp_path):
    rows = 30_000
    env = killable_env(dict(os.environ, JAX_PLATFORMS="cpu"))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "s"), str(rows)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    committed = []
    deadline = time.time() + 120
    while len(committed) < 3 and time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith("committed"):
            committed.append(int(line.split()[1]))
    time.sleep(0.05 + 0.1 * np.random.default_rng().random())      # land somewhere inside a later append
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(committed) >= 3, "the writer never committed"
    ds = Datastore.open(tmp_path / "s")
    n = len(ds)
    assert n >= committed[-1] and n % rows == 0            # a commit is all of one append or none of it
    ids = np.arange(n)
    expected = (np.sin(ids[:, None] * 0.001 + np.arange(32)[None]) * 8).astype(np.float32).astype(np.float16)
    np.testing.assert_array_equal(ds.keys, expected)
    np.testing.assert_array_equal(ds.values, ids % 8192)
    ds.add(expected[:5], np.arange(5))                      # and it keeps working after the crash
    assert len(Datastore.open(tmp_path / "s")) == n + 5


def test_stale_tensorstore_lock_files_and_temporaries_never_reach_a_commit(tmp_path):
    """The failure that lost a store: a killed writer's `<key>.__lock` (reused without truncation by
    tensorstore's file kvstore) and our own temporaries, planted longer than any real file."""
    rng = np.random.default_rng(5)
    keys = rng.normal(size=(300, 8)).astype(np.float32)
    ds = Datastore.create(tmp_path / "s", dim=8)
    ds.add(keys[:100], np.arange(100))
    junk = b"x" * 4096
    for name in ("manifest.json.__lock", "commits/0000000000000002.json.__lock",
                 "commits/0000000000000003.json.__lock", "commits/.0000000000000003.json.tmp-999999999-abcd"):
        (tmp_path / "s" / name).write_bytes(junk)
    again = Datastore.open(tmp_path / "s")
    assert not (tmp_path / "s" / "commits" / ".0000000000000003.json.tmp-999999999-abcd").exists()
    again.add(keys[100:200], np.arange(100, 200))
    again.add(keys[200:], np.arange(200, 300))
    third = Datastore.open(tmp_path / "s")
    assert len(third) == 300 and third.manifest["dim"] == 8
    np.testing.assert_array_equal(third.keys, keys.astype(np.float16))
    for record in (tmp_path / "s" / "commits").glob("*.json"):
        json.loads(record.read_text())                    # every record parses: nothing stale appended


def test_a_damaged_newest_commit_falls_back_and_is_never_overwritten(tmp_path, caplog):
    rng = np.random.default_rng(6)
    keys = rng.normal(size=(30, 4)).astype(np.float32)
    ds = Datastore.create(tmp_path / "s", dim=4)
    for i in range(3):
        ds.add(keys[10 * i:10 * (i + 1)], np.arange(10))
    newest = sorted((tmp_path / "s" / "commits").glob("*.json"))[-1]
    record = json.loads(newest.read_text())
    record["body"]["count"] = 29                           # bit rot: the checksum no longer matches
    newest.write_text(json.dumps(record))
    reopened = Datastore.open(tmp_path / "s")
    assert len(reopened) == 20 and "damaged" in caplog.text
    reopened.add(keys[20:], np.arange(10))
    assert newest.read_text() == json.dumps(record)       # the damaged record was left as evidence
    assert len(Datastore.open(tmp_path / "s")) == 30
    for record in (tmp_path / "s" / "commits").glob("*.json"):
        record.write_text("{}")
    with pytest.raises(DatastoreError, match="none of the .* commit records"):
        Datastore.open(tmp_path / "s")


def test_rollback_drops_later_rows_and_keeps_working(tmp_path):
    rng = np.random.default_rng(7)
    keys = rng.normal(size=(500, 8)).astype(np.float32)
    ds = Datastore.create(tmp_path / "s", dim=8)
    ds.add(keys[:300], np.arange(300))
    ds.add(keys[300:400], np.arange(100))
    ds.rollback(300)
    assert len(ds) == len(Datastore.open(tmp_path / "s")) == 300
    with pytest.raises(ValueError, match=r"\[0, 300\]"):
        ds.rollback(301)
    ds.add(keys[400:], np.arange(100))
    reopened = Datastore.open(tmp_path / "s")
    np.testing.assert_array_equal(reopened.keys, np.concatenate([keys[:300], keys[400:]]).astype(np.float16))
    _, ids = reopened.search(keys[450:455], 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(350, 355))


def test_a_version_1_store_opens_and_upgrades_on_its_next_commit(tmp_path):
    rng = np.random.default_rng(8)
    keys = rng.normal(size=(200, 8)).astype(np.float32)
    ds = Datastore.create(tmp_path / "s", dim=8)
    ds.add(keys[:120], np.arange(120))
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())      # rewrite it as version 1 did
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(dict(manifest, version=1, count=120)))
    for record in (tmp_path / "s" / "commits").glob("*.json"):
        record.unlink()
    old = Datastore.open(tmp_path / "s")
    assert len(old) == 120
    old.add(keys[120:], np.arange(80))
    np.testing.assert_array_equal(Datastore.open(tmp_path / "s").keys, keys.astype(np.float16))


@pytest.mark.parametrize("q,n,k", [(7, 4096, 64), (5, 16384, 64), (3, 1000, 10), (4, 256, 64), (2, 64, 64),
                                   (6, 2048, 1)])
def test_min_k_is_exactly_top_k(q, n, k):
    """The grouped exact top-k (group minima, then the chosen groups) returns top_k's values and indices,
    including rows with ties and infinities (masked rows), on shapes where grouping applies and where it
    falls back."""
    from jaxcl.memory.index import min_k
    rng = np.random.default_rng(n + k)
    d = rng.standard_normal((q, n)).astype(np.float32)
    d[0, : n // 2] = np.inf                                   # a half-masked row
    d[-1] = np.round(d[-1])                                   # a row of ties
    vals, idx = jax.jit(min_k, static_argnums=1)(jnp.asarray(d), k)
    neg, ref_idx = jax.lax.top_k(-jnp.asarray(d), k)
    np.testing.assert_array_equal(np.asarray(vals), -np.asarray(neg))
    np.testing.assert_array_equal(np.take_along_axis(d, np.asarray(idx), 1), np.asarray(vals))   # indices match values
    np.testing.assert_array_equal(np.asarray(idx)[:-1], np.asarray(ref_idx)[:-1])       # no ties: same indices


# ---------------------------------------------------------------- damaged chunk files (docs/reliability.md)
def _files(root):
    """Every file under `root` with its bytes (to prove a failed open changed nothing)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def _chunked_store(path, rows=600):
    """A committed store of many chunks: keys 16 rows per chunk (`keys/<i>.0`, 38 files), values 256
    (`values/<i>`, 3 files), written by two appends so that chunks were rewritten across commits."""
    rng = np.random.default_rng(11)
    keys = rng.normal(size=(rows, 8)).astype(np.float32)
    values = rng.integers(0, 1000, rows).astype(np.int32)
    ds = Datastore.create(path, dim=8, chunk_rows=16)
    ds.add(keys[:250], values[:250])
    ds.add(keys[250:], values[250:])
    return keys, values


@pytest.mark.parametrize("chunk", ["keys/0.0", "keys/20.0", "keys/37.0", "values/0", "values/2"])
def test_a_missing_chunk_file_is_named_and_the_store_left_as_it_was(tmp_path, chunk):
    """The reproduced bug: a deleted chunk read as fill values (all 0) and answered. Now open refuses,
    naming the file, before anything (even a dead writer's temporary) is touched."""
    store = tmp_path / "s"
    _chunked_store(store)
    (store / chunk).unlink()
    (store / "commits" / ".0000000000000009.json.tmp-999999999-abcd").write_bytes(b"junk")
    before = _files(store)
    with pytest.raises(DatastoreError) as err:
        Datastore.open(store)
    message = str(err.value)
    assert f"{store / chunk} is missing" in message and "rebuild the memory" in message
    assert "\n" not in message
    assert _files(store) == before


@pytest.mark.parametrize("chunk", ["keys/3.0", "values/1"])
def test_a_short_or_changed_chunk_file_is_named(tmp_path, chunk):
    store = tmp_path / "s"
    _chunked_store(store)
    data = (store / chunk).read_bytes()
    (store / chunk).write_bytes(data[:len(data) // 3])                      # truncated
    before = _files(store)
    with pytest.raises(DatastoreError, match=f"{re.escape(str(store / chunk))} is {len(data) // 3} bytes"):
        Datastore.open(store)
    assert _files(store) == before
    flipped = bytearray(data)
    flipped[5] ^= 0x40                                                      # bit rot: same size, decodes fine
    (store / chunk).write_bytes(bytes(flipped))
    before = _files(store)
    with pytest.raises(DatastoreError, match=f"{re.escape(str(store / chunk))} does not hold the bytes committed"):
        Datastore.open(store)
    assert _files(store) == before


def test_a_chunk_tensorstore_cannot_decode_is_named_not_a_traceback(tmp_path, monkeypatch):
    """What the size check cannot see (an object store, or a file cut short after the check): the
    tensorstore read error becomes a DatastoreError naming the file. A missing `.zarray` too."""
    store = tmp_path / "s"
    _chunked_store(store)
    (store / "values" / "1").write_bytes(b"\0" * 100)
    monkeypatch.setattr(Datastore, "_check_chunk_files", lambda self, count: None)
    with pytest.raises(DatastoreError, match=f"{re.escape(str(store / 'values' / '1'))} cannot be decoded"):
        Datastore.open(store)
    monkeypatch.undo()
    (store / "keys" / ".zarray").unlink()
    with pytest.raises(DatastoreError, match=re.escape(str(store / "keys" / ".zarray"))):
        Datastore.open(store)


def test_an_intact_store_of_many_chunks_opens_and_searches_exactly(tmp_path):
    store = tmp_path / "s"
    keys, values = _chunked_store(store)
    ds = Datastore.open(store)
    assert len(ds) == 600
    np.testing.assert_array_equal(ds.values, values)
    queries = np.random.default_rng(12).normal(size=(9, 8)).astype(np.float32)
    dists, ids = ds.search(queries, 7)
    ref_d, ref_i = brute_force(keys, queries, 7)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(dists, ref_d, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ds.values[ids], values[ref_i])


def test_a_store_committed_before_chunk_checksums_opens_and_gains_them(tmp_path):
    """Commit records without a `chunks` entry (the format before checksums) keep opening (existence and
    size checks only); the next commit lists every chunk's CRC-32."""
    from jaxcl.memory.storage import _digest
    store = tmp_path / "s"
    keys, values = _chunked_store(store)
    for path in (store / "commits").glob("*.json"):
        record = json.loads(path.read_text())
        body = {k: v for k, v in record["body"].items() if k != "chunks"}
        path.write_text(json.dumps({"body": body, "sha256": _digest(body)}, indent=1))
    ds = Datastore.open(store)
    np.testing.assert_array_equal(ds.keys, keys.astype(np.float16))
    ds.add(keys[:5], values[:5])
    newest = json.loads(max((store / "commits").glob("*.json")).read_text())["body"]
    assert len(newest["chunks"]["keys"]["crc32"]) == 38 and len(newest["chunks"]["values"]["crc32"]) == 3
    flipped = bytearray((store / "keys" / "1.0").read_bytes())
    flipped[0] ^= 1
    (store / "keys" / "1.0").write_bytes(bytes(flipped))
    with pytest.raises(DatastoreError, match="keys/1.0 does not hold the bytes committed"):
        Datastore.open(store)


def test_rows_past_the_commit_are_not_checked(tmp_path):
    """A writer killed mid-append leaves rows past the committed count: partial chunks, a chunk of
    the committed tail rewritten with more rows, a tensorstore `.__lock` temporary, even a short file
    past the count. None of it is part of the store, so none of it is an error."""
    import tensorstore as ts
    store = tmp_path / "s"
    keys, values = _chunked_store(store)
    arr = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(store / "keys") + "/"}},
                  open=True).result()
    arr[600:700].write(np.ones((100, 8), np.float16)).result()             # uncommitted rows 600..699
    (store / "keys" / "45.0").write_bytes(b"\1" * 10)                      # a short chunk past the count
    (store / "keys" / "46.0.__lock").write_bytes(b"\1" * 300)
    (store / "values" / "3").write_bytes(b"\1" * 7)
    ds = Datastore.open(store)
    assert len(ds) == 600
    np.testing.assert_array_equal(ds.keys, keys.astype(np.float16))
    ds.add(keys[:50], values[:50])                                          # and the rows are overwritten
    again = Datastore.open(store)
    np.testing.assert_array_equal(again.keys, np.concatenate([keys, keys[:50]]).astype(np.float16))
    np.testing.assert_array_equal(again.values, np.concatenate([values, values[:50]]))


def test_a_chunk_lost_after_open_never_changes_an_answer_or_a_committed_row(tmp_path):
    """Search is served from the rows read at open; an append rewrites the chunk it extends from the
    host copy (never reads the lost file back as fill values)."""
    store = tmp_path / "s"
    keys, values = _chunked_store(store)
    ds = Datastore.open(store)
    (store / "keys" / "37.0").unlink()                                      # the chunk of rows 592..599
    (store / "values" / "2").unlink()                                       # rows 512..599
    _, ids = ds.search(keys[590:600], 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(590, 600))
    np.testing.assert_array_equal(ds.values[ids[:, 0]], values[590:600])
    ds.add(keys[:3], values[:3])
    again = Datastore.open(store)
    np.testing.assert_array_equal(again.keys, np.concatenate([keys, keys[:3]]).astype(np.float16))
    np.testing.assert_array_equal(again.values, np.concatenate([values, values[:3]]))
