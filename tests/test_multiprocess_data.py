"""Two JAX processes on localhost: on any mesh (the batch split over processes, replicated across them
by a tensor axis spanning both, or mixed) the global batch and the training losses equal one process's."""

import numpy as np
import pytest

from jaxcl.data.stream import SequenceStream
from tests.multiprocess_cases import CASES, GLOBAL_BATCH, SEED, STEPS, case_mesh, sequences, tensor_processes, \
    train_losses
from tests.process_launcher import run_workers


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_workers("multiprocess_worker.py", tmp_path_factory.mktemp("multiprocess"))


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_build_the_single_process_batch_and_losses(results, name):
    single = SequenceStream(sequences(), global_batch=GLOBAL_BATCH, seed=SEED)
    expected = np.stack([single.next_batch()["input_ids"] for _ in range(STEPS)])     # [steps, 8, 16]
    assert len({tuple(r) for r in expected.reshape(-1, expected.shape[-1])}) > GLOBAL_BATCH   # rows differ
    prompts = np.stack([np.arange(GLOBAL_BATCH) + 10 * s for s in range(STEPS)])
    mesh = case_mesh(name)                          # the same layout over this process's 8 fake devices
    assert tensor_processes(mesh) == {0}
    reference = train_losses(mesh)
    assert reference[-1] < reference[0]             # it trains
    for r in results:
        np.testing.assert_array_equal(r[f"{name}/gathered"], expected)
        np.testing.assert_array_equal(r[f"{name}/prompt_ids"], prompts)
        assert int(r[f"{name}/position"]) == STEPS * GLOBAL_BATCH
        np.testing.assert_allclose(r[f"{name}/losses"], reference, atol=1e-6, rtol=0)
