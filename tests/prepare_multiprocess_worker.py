"""One process of the two-process prepare test (run by tests/test_token_cache.py, not by pytest).

Both processes prepare one cache in a shared directory (each tokenizes its share of the units, process 0
commits), then read it and assemble the same global batches; this process saves what it read.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import numpy as np  # noqa: E402


def main(coordinator: str, process_id: int, out_dir: str) -> None:
    import jax

    from jaxcl.data.cache import open_splits
    from jaxcl.data.stream import SequenceStream
    from jaxcl.data.tokenizer import load_tokenizer
    from jaxcl.parallel import initialize_distributed
    from tests.test_token_cache import SPLITS_2P

    initialize_distributed(coordinator, num_processes=2, process_id=process_id)
    assert jax.process_count() == 2
    src = os.path.join(out_dir, "src")
    splits = open_splits(source_spec=src, text_field="text", tokenizer=load_tokenizer("default"),
                         tokenizer_spec="default", cache=os.path.join(out_dir, "cache-2"),
                         domains=("scripture", "pydoc", "man"), splits=("train", "valid"), processes=1,
                         progress=False, segment_bytes=64 << 10)
    out = {}
    for d, s in SPLITS_2P:
        split = splits[(d, s)]
        out[f"{d}/{s}/tokens"] = split.read(0, split.tokens)
        out[f"{d}/{s}/lengths"] = split.document_lengths()
        out[f"{d}/{s}/writers"] = np.asarray([r["process_index"] for r in _records(split)])
    stream = SequenceStream(splits[("scripture", "train")].rows(32), 8, seed=4)
    out["batches"] = np.stack([np.asarray(stream.next_batch()["input_ids"]) for _ in range(5)])
    np.savez(os.path.join(out_dir, f"process{process_id}.npz"), **out)


def _records(split):
    import json

    return [json.loads(split.files.read_bytes(f"{split.prefix}{name}.json")) for name in split.names]


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
