"""Sequence streams: deterministic, epoch-complete, restorable; eval batches padded with masked rows;
global batches placed on any mesh."""

import numpy as np
import pytest

from jaxcl.config import ConfigError, MeshConfig
from jaxcl.data.stream import SequenceStream, device_batch, eval_batches, pack_sequences
from jaxcl.data.tokenizer import load_tokenizer
from jaxcl.parallel import batch_sharding, make_mesh


def make_stream(position=0, seed=3):
    seqs = np.arange(20 * 4, dtype=np.int32).reshape(20, 4)
    return SequenceStream(seqs, global_batch=5, seed=seed, position=position)


def rows(stream, steps):
    return [tuple(r[0] // 4 for r in stream.next_batch()["input_ids"]) for _ in range(steps)]


def test_stream_is_deterministic_and_covers_each_epoch_once():
    a, b = make_stream(), make_stream()
    first = rows(a, 8)
    assert first == rows(b, 8)
    epoch0 = [i for batch in first[:4] for i in batch]
    epoch1 = [i for batch in first[4:] for i in batch]
    assert sorted(epoch0) == sorted(epoch1) == list(range(20))
    assert epoch0 != epoch1                                    # reshuffled each epoch
    assert rows(make_stream(seed=4), 4) != first[:4]


def test_restored_stream_continues_exactly():
    a = make_stream()
    rows(a, 3)
    b = make_stream()
    b.restore(a.state())
    assert rows(a, 5) == rows(b, 5)
    with pytest.raises(ConfigError, match="data or data.seq_len changed"):
        SequenceStream(np.zeros((7, 4), np.int32), 5, 3).restore(a.state())


def test_eval_batches_pad_with_masked_rows():
    seqs = np.arange(7 * 3).reshape(7, 3)
    batches = list(eval_batches(seqs, global_batch=4))
    assert len(batches) == 2
    np.testing.assert_array_equal(batches[0]["input_ids"], seqs[0:4])
    np.testing.assert_array_equal(batches[1]["input_ids"][:3], seqs[4:7])
    assert batches[1]["attention_mask"][:, 0].tolist() == [1, 1, 1, 0]   # rows 4-6 real, row 7 padding


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 1, 8)])
def test_device_batch_is_the_numpy_batch_on_any_mesh(shape):
    mesh = make_mesh(MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2]))
    batch = make_stream().next_batch() | {"prompt_ids": np.arange(5, dtype=np.int32)}
    batch = {k: np.concatenate([v, v[:3]]) for k, v in batch.items()}        # 8 rows
    out = device_batch(batch, batch_sharding(mesh))
    for k, v in batch.items():
        assert out[k].shape == v.shape and out[k].dtype == v.dtype
        np.testing.assert_array_equal(np.asarray(out[k]), v)
    assert tuple(out["prompt_ids"].sharding.spec) == tuple(batch_sharding(mesh).spec)[:1]
    with pytest.raises(ConfigError, match="batch of 5 rows cannot be split over the 8 shards"):
        device_batch(make_stream().next_batch(), batch_sharding(make_mesh(MeshConfig(data=8))))


def test_pack_and_tokenizer_round_trip():
    tok = load_tokenizer("default")
    assert tok.vocab_size == 8192 and tok.eos_id == 0 and tok.pad_id == 1
    stream = tok.encode_documents(["In the beginning", "ls - list directory contents"])
    assert stream.dtype == np.int32 and (stream == tok.eos_id).sum() == 2
    assert tok.decode(stream[:-1]).split("<|endoftext|>") == ["In the beginning", "ls - list directory contents"]
    packed = pack_sequences(np.arange(10), 3)
    assert packed.shape == (3, 3)
    with pytest.raises(ConfigError, match="fewer than data.seq_len=16"):
        pack_sequences(np.arange(10), 16, "domain 'x'")


def test_document_slices_partition_the_documents_in_order():
    from jaxcl.data.stream import document_slice

    docs = [f"d{i}" for i in range(11)]
    past, future = document_slice(docs, (0.0, 0.5)), document_slice(docs, (0.5, 1.0))
    assert past == docs[:5] and future == docs[5:] and past + future == docs
    assert document_slice(docs) == docs and document_slice(docs, (0.2, 0.4)) == docs[2:4]


def test_train_documents_limits_what_a_run_reads(tmp_path):
    from jaxcl.config import load_config
    from jaxcl.train.loop import ContinualRun

    small = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64", "model.max_seq_len=64",
             "data.seq_len=64", "data.domains=[jargon]", f"run.dir={tmp_path}"]
    whole = ContinualRun(load_config("configs/demo.yaml", small)).train_sequences["jargon"]
    half = ContinualRun(load_config("configs/demo.yaml", [*small, "data.train_documents=[0, 0.5]"]))
    rest = ContinualRun(load_config("configs/demo.yaml", [*small, "data.train_documents=[0.5, 1]"]))
    past, future = half.train_sequences["jargon"], rest.train_sequences["jargon"]
    # the two halves' token streams are the whole stream's (each packs its own ragged tail away)
    assert abs(len(past) + len(future) - len(whole)) <= 1
    np.testing.assert_array_equal(past, whole[:len(past)])
