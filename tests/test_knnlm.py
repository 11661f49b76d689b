"""knn_lm_logprobs / knn_lm_target_logprobs against a straightforward NumPy reference."""

import numpy as np
import pytest

from jaxcl.memory import knn_lm_logprobs, knn_lm_target_logprobs


def reference(lm_logits, dists, values, lam, temperature, mask=None):
    """Loop-by-loop NumPy float64: p = (1 - λ) softmax(logits) + λ Σ_i softmax(-d/T)_i onehot(v_i)."""
    lm_logits = np.asarray(lm_logits, np.float64)
    n, vocab = lm_logits.shape
    out = np.empty((n, vocab))
    lam = np.broadcast_to(np.asarray(lam, np.float64), (n,))
    for row in range(n):
        p_lm = np.exp(lm_logits[row] - lm_logits[row].max())
        p_lm /= p_lm.sum()
        valid = np.isfinite(dists[row]) & (True if mask is None else mask[row])
        p_knn = np.zeros(vocab)
        if valid.any():
            s = -np.asarray(dists[row], np.float64)[valid] / temperature
            w = np.exp(s - s.max())
            w /= w.sum()
            for weight, v in zip(w, values[row][valid]):
                p_knn[v] += weight
            l = lam[row]
        else:
            l = 0.0
        with np.errstate(divide="ignore"):
            out[row] = np.log((1 - l) * p_lm + l * p_knn)
    return out


CASES = [  # (rows, vocab, k, lam, temperature, distance scale)
    (6, 50, 8, 0.25, 1.0, 1.0),
    (5, 40, 16, 0.0, 2.0, 10.0),
    (5, 40, 16, 1.0, 0.5, 3.0),
    (4, 300, 1024, 0.6, 10.0, 1000.0),      # k = 1024, distances in the thousands
    (7, 30, 32, "per-row", 5.0, 50.0),
]


@pytest.mark.parametrize("rows,vocab,k,lam,temperature,scale", CASES)
def test_matches_numpy_reference(rows, vocab, k, lam, temperature, scale):
    rng = np.random.default_rng(rows * 1000 + k)
    logits = rng.normal(size=(rows, vocab)).astype(np.float32) * 3
    dists = (rng.random((rows, k)) * scale).astype(np.float32)
    values = rng.integers(0, max(3, vocab // 8), size=(rows, k)).astype(np.int32)   # many duplicate ids
    lam = rng.random(rows).astype(np.float32) if lam == "per-row" else lam
    expected = reference(logits, dists, values, lam, temperature)
    got = np.asarray(knn_lm_logprobs(logits, dists, values, lam=lam, temperature=temperature))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    targets = rng.integers(0, vocab, size=rows)
    targets[::2] = values[::2, 0]             # half of the targets are among the neighbours
    lm_target = logits[np.arange(rows), targets] - np.log(np.exp(logits.astype(np.float64)).sum(-1))
    got_t = np.asarray(knn_lm_target_logprobs(lm_target, dists, values, targets, lam=lam, temperature=temperature))
    np.testing.assert_allclose(got_t, expected[np.arange(rows), targets], atol=1e-5, rtol=1e-5)
    # A proper distribution over the vocabulary.
    np.testing.assert_allclose(np.exp(got).sum(-1), 1.0, atol=1e-5)


def test_lambda_one_gives_zero_probability_to_tokens_without_neighbours():
    logits = np.zeros((1, 10), np.float32)
    got = np.asarray(knn_lm_logprobs(logits, np.array([[1.0, 2.0]]), np.array([[3, 3]]), lam=1.0))
    assert got[0, 3] == pytest.approx(0.0, abs=1e-6) and np.all(np.isneginf(np.delete(got[0], 3)))


def test_padded_neighbours_and_positions_without_neighbours_fall_back_to_the_lm():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 20)).astype(np.float32)
    dists = rng.random((3, 6)).astype(np.float32) * 4
    values = rng.integers(0, 20, size=(3, 6)).astype(np.int32)
    mask = np.ones((3, 6), bool)
    mask[0, 3:] = False                       # row 0: 3 padded neighbours
    mask[1] = False                           # row 1: no neighbour at all (e.g. a padded position)
    dists[2, 4:] = np.inf                     # row 2: padding signalled by infinite distances
    got = np.asarray(knn_lm_logprobs(logits, dists, values, lam=0.4, temperature=2.0, neighbor_mask=mask))
    np.testing.assert_allclose(got, reference(logits, dists, values, 0.4, 2.0, mask), atol=1e-5)
    lm_logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(got[1], lm_logp[1], atol=1e-6)
    assert np.all(np.isfinite(got))


def test_large_distances_are_stable():
    logits = np.zeros((2, 8), np.float32)
    dists = np.array([[1e6, 1e6 + 1, 1e6 + 2], [5e4, 5e4, 9e4]], np.float32)
    values = np.array([[1, 2, 1], [4, 5, 6]], np.int32)
    got = np.asarray(knn_lm_logprobs(logits, dists, values, lam=0.5, temperature=1.0))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, reference(logits, dists, values, 0.5, 1.0), atol=1e-5)
