"""The λ calibrator: how much to trust the memory, per token (SeMem §2.4).

A selectively filled memory has no neighbours for easy tokens, so one constant λ costs those tokens
λ of their probability mass; the calibrator predicts λ per token from features that say whether the
retrieved neighbours are worth trusting:

- distribution: the LM's confidence max_y p_LM(y) and its entropy;
- lexical: log frequency of the last context token in the text streamed so far;
- density: log(1 + d) of the top-10 neighbour distances and log of the number of distinct values
  among the top-1..10 neighbours.

`mode="mlp"`: a small MLP (LeakyReLU, dropout) -> λ per token. `mode="constant"`: one λ. Both also fit
one kNN temperature T, and both are trained from scratch, on held-out tokens of the chunks seen so far,
to maximise the mixture's likelihood log((1-λ) p_LM(gold) + λ p_kNN(gold; T)).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from jaxcl.memory.knnlm import knn_neighbor_logweights, mix_logprobs

__all__ = ["Calibrator", "CalibrationData", "calibrator_features", "fit_calibrator", "fit_calibrators", "mixture_nll",
           "N_TOP"]

N_TOP = 10


def calibrator_features(lm_conf: np.ndarray, lm_entropy: np.ndarray, log_freq: np.ndarray,
                        dists: np.ndarray, neighbor_values: np.ndarray) -> np.ndarray:
    """Per-token features `[n, 3 + 2 * N_TOP]` float32 (see the module docstring).

    lm_conf, lm_entropy, log_freq [n]; dists [n, k] ascending; neighbor_values [n, k].
    """
    n, k = dists.shape
    top_d = np.full((n, N_TOP), np.float32(1e4))
    top_v = np.full((n, N_TOP), -1, np.int64)
    m = min(k, N_TOP)
    top_d[:, :m] = np.where(np.isfinite(dists[:, :m]), dists[:, :m], 1e4)
    top_v[:, :m] = neighbor_values[:, :m]
    same = top_v[:, :, None] == top_v[:, None, :]                              # [n, 10, 10]
    first = ~np.any(np.tril(same, -1), axis=2) & (top_v >= 0)                  # first occurrence of a value
    distinct = np.maximum(np.cumsum(first, axis=1), 1)                         # [n, 10]
    return np.concatenate([lm_conf[:, None], lm_entropy[:, None], log_freq[:, None],
                           np.log1p(np.maximum(top_d, 0.0)), np.log(distinct)], axis=1).astype(np.float32)


@dataclasses.dataclass
class CalibrationData:
    """Held-out tokens: features [n, F], log p_LM(gold) [n], neighbour distances [n, k], gold match [n, k]."""

    features: np.ndarray
    lm_logp: np.ndarray
    dists: np.ndarray
    match: np.ndarray

    def __len__(self) -> int:
        return len(self.lm_logp)

    def extend(self, other: "CalibrationData") -> "CalibrationData":
        if not len(self):
            return other
        k = min(self.dists.shape[1], other.dists.shape[1])
        return CalibrationData(np.concatenate([self.features, other.features]),
                               np.concatenate([self.lm_logp, other.lm_logp]),
                               np.concatenate([self.dists[:, :k], other.dists[:, :k]]),
                               np.concatenate([self.match[:, :k], other.match[:, :k]]))


def byte_dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Inverted dropout whose keep mask comes from random *bytes*: one 32-bit random word decides 4 units.

    Why: on CPU, generating random bits (threefry) costs more than the calibrator's whole forward and
    backward; slicing each 32-bit word into 4 bytes draws 4x fewer words. The keep probability is
    quantised to 1/256: keep = round((1 - rate) * 256) / 256 (rate 0.2 -> 0.1992), and kept units are scaled
    by its inverse, so the layer is unbiased. x [..., h] with h a multiple of 4.
    """
    if x.shape[-1] % 4:
        raise ValueError(f"byte_dropout: the last axis ({x.shape[-1]}) must be a multiple of 4")
    threshold = int(round((1.0 - rate) * 256))
    words = jax.random.bits(key, x.shape[:-1] + (x.shape[-1] // 4,), jnp.uint32)
    shifts = jnp.arange(4, dtype=jnp.uint32) * 8
    u8 = ((words[..., None] >> shifts) & 0xFF).reshape(x.shape)
    return jnp.where(u8 < threshold, x * (256.0 / threshold), 0.0).astype(x.dtype)


class LambdaNet(nn.Module):
    """features [n, F] -> λ logit [n]: `layers` x (Dense -> LeakyReLU -> dropout), then Dense(1).

    Dropout is `byte_dropout` (rate quantised to 1/256) on the "dropout" rng stream."""

    hidden: int = 128
    layers: int = 4
    dropout: float = 0.2

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        for _ in range(self.layers):
            x = nn.Dense(self.hidden)(x)
            x = nn.leaky_relu(x)
            if not deterministic and self.dropout > 0:
                x = byte_dropout(x, self.dropout, self.make_rng("dropout"))
        return nn.Dense(1)(x)[..., 0]


@dataclasses.dataclass
class Calibrator:
    """λ per token (or one λ) and the kNN temperature T; `lam_and_temperature(features)`."""

    mode: str
    params: dict[str, Any]
    mean: np.ndarray
    std: np.ndarray
    hidden: int = 128

    @classmethod
    def initial(cls, lam: float, temperature: float, n_features: int = 3 + 2 * N_TOP, mode: str = "constant"):
        """The calibrator before any held-out data exists: constant λ and T."""
        params = {"lam_logit": jnp.float32(np.log(max(lam, 1e-6) / max(1 - lam, 1e-6))),
                  "log_temperature": jnp.float32(np.log(temperature))}
        return cls("constant", params, np.zeros(n_features, np.float32), np.ones(n_features, np.float32))

    @property
    def temperature(self) -> float:
        return float(np.exp(self.params["log_temperature"]))

    def lam(self, features: np.ndarray) -> np.ndarray:
        """λ `[n]` for features `[n, F]`."""
        x = np.asarray((features - self.mean) / self.std, np.float32)
        return np.asarray(_lam_jit(self.mode, self.hidden, self.params, x))

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """Flat `{name: array}` (for an `.npz`): `meta` (mode, hidden as JSON bytes), `mean`, `std`, `params/...`."""
        meta = json.dumps({"mode": self.mode, "hidden": self.hidden}).encode()
        out = {f"{prefix}meta": np.frombuffer(meta, np.uint8), f"{prefix}mean": np.asarray(self.mean),
               f"{prefix}std": np.asarray(self.std)}
        for path, leaf in _flatten(self.params):
            out[f"{prefix}params/{path}"] = np.asarray(jax.device_get(leaf))
        return out

    @classmethod
    def from_arrays(cls, arrays: Any, prefix: str = "") -> "Calibrator":
        """The inverse of `to_arrays` (`arrays`: a dict or an open `np.load` archive)."""
        meta = json.loads(bytes(np.asarray(arrays[f"{prefix}meta"])).decode())
        heads = (f"{prefix}params/", f"{prefix}params|")         # "|": semem_state.npz files before 2026-11
        params = _unflatten({k[len(h):]: np.asarray(arrays[k]) for k in arrays.keys() for h in heads
                             if k.startswith(h)})
        return cls(meta["mode"], params, np.asarray(arrays[f"{prefix}mean"]), np.asarray(arrays[f"{prefix}std"]),
                   meta["hidden"])


def _flatten(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(path "a/b/c", leaf) of a nested dict of arrays (calibrator parameters)."""
    if isinstance(tree, dict):
        return [item for k in sorted(tree) for item in _flatten(tree[k], f"{prefix}{k}/")]
    return [(prefix.rstrip("/"), tree)]


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, leaf in flat.items():
        *parents, last = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return out


LAM_RANGE = (1e-4, 1 - 1e-4)    # a learned λ never reaches 0 or 1: either would make some gold token impossible


@functools.partial(jax.jit, static_argnums=(0, 1))
def _lam_jit(mode: str, hidden: int, params, x):
    return _lam(mode, hidden, params, x)


def _lam(mode: str, hidden: int, params, x, deterministic=True, rng=None):
    if mode == "constant":
        logit = jnp.broadcast_to(params["lam_logit"], x.shape[:1])
    else:
        logit = LambdaNet(hidden).apply({"params": params["net"]}, x, deterministic=deterministic,
                                        rngs=None if deterministic else {"dropout": rng})
    return jnp.clip(jax.nn.sigmoid(logit), *LAM_RANGE)


def mixture_nll(mode: str, hidden: int, params, x, lm_logp, dists, match, deterministic=True, rng=None):
    """Mean -log((1-λ) p_LM(gold) + λ p_kNN(gold; T)) over held-out tokens."""
    lam = _lam(mode, hidden, params, x, deterministic, rng)
    logw, any_valid = knn_neighbor_logweights(dists, jnp.exp(params["log_temperature"]))
    knn_logp = jax.nn.logsumexp(jnp.where(match, logw, -jnp.inf), axis=-1)
    return -jnp.mean(mix_logprobs(lm_logp, knn_logp, lam, any_valid))


@functools.lru_cache(maxsize=8)
def _adam(lr: float) -> optax.GradientTransformation:
    return optax.adam(lr)          # one object per lr, so the jitted fit below is compiled once


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _fit_steps(mode, hidden, tx, params, x, lm_logp, dists, match, idx, rng):
    """Every Adam step of a fit in one compiled scan, vmapped over memories: params' leaves and the data
    carry a leading memory axis [m, ...]; `idx [steps, b]` (the minibatch rows) and `rng` (the dropout key
    of step s is `fold_in(rng, s)`) are shared by all memories. One dispatch per fit instead of one per step
    per memory: the step is small enough that per-call and per-op overheads dominated it."""

    def fit_one(params, x, lm_logp, dists, match):
        opt = tx.init(params)

        def step(carry, inputs):
            params, opt = carry
            s, rows = inputs
            key = jax.random.fold_in(rng, s)
            loss = lambda p: mixture_nll(mode, hidden, p, x[rows], lm_logp[rows], dists[rows], match[rows],
                                         False, key)
            grads = jax.grad(loss)(params)
            updates, opt = tx.update(grads, opt, params)
            return (optax.apply_updates(params, updates), opt), None

        steps = jnp.arange(idx.shape[0], dtype=jnp.int32)
        (params, _), _ = jax.lax.scan(step, (params, opt), (steps, idx))
        return params

    return jax.vmap(fit_one)(params, x, lm_logp, dists, match)


def fit_calibrator(data: CalibrationData, mode: str, *, init: Calibrator, steps: int = 300, lr: float = 3e-3,
                   hidden: int = 128, batch: int = 1024, rng: jax.Array | None = None) -> Calibrator:
    """Train a calibrator from scratch on held-out tokens (Adam on the mixture NLL); T starts at `init`'s.

    `data`: held-out tokens of the memory (features, log p_LM(gold), neighbour distances, gold match);
    `mode`: "mlp" | "constant"; `steps` Adam steps at `lr` on minibatches of `batch` tokens drawn with
    replacement (a fixed size: one compile for every chunk of a stream); `rng` seeds the MLP's
    initialisation, the minibatch order and dropout. SeMem §2.4 (the λ calibrator).
    """
    return fit_calibrators([data], mode, inits=[init], steps=steps, lr=lr, hidden=hidden, batch=batch,
                           rng=rng)[0]


def fit_calibrators(datas: list[CalibrationData], mode: str, *, inits: list[Calibrator], steps: int = 300,
                    lr: float = 3e-3, hidden: int = 128, batch: int = 1024,
                    rng: jax.Array | None = None) -> list[Calibrator]:
    """`fit_calibrator` for several memories at once, as one vmapped, compiled fit.

    Why: a SeMem stream refits one calibrator per policy (δ sweep, RandMem, full memorization) after every
    chunk; fitted together they cost about one fit. Every memory gets the fit `fit_calibrator` would give it
    alone with the same `rng` (same initialisation, minibatch rows and dropout keys; equal up to float
    rounding). `datas[i]` and `inits[i]` belong to memory i; all `datas` must hold the same number of
    held-out tokens and neighbours (the same held-out subset scored against each memory), else ValueError.
    """
    if len(datas) != len(inits) or not datas:
        raise ValueError(f"fit_calibrators: {len(datas)} data sets for {len(inits)} initial calibrators")
    shapes = {(len(d), d.dists.shape[1], d.features.shape[1]) for d in datas}
    if len(shapes) != 1:
        raise ValueError(f"fit_calibrators: the memories' held-out data differ in shape (tokens, k, features): "
                         f"{sorted(shapes)}; fit them separately")
    rng = jax.random.key(0) if rng is None else rng
    means = [d.features.mean(0) for d in datas]
    stds = [d.features.std(0) + 1e-3 for d in datas]
    x = np.stack([(d.features - m) / s for d, m, s in zip(datas, means, stds)]).astype(np.float32)
    params: dict[str, Any] = {"log_temperature": jnp.asarray([np.float32(i.params["log_temperature"])
                                                              for i in inits])}
    if mode == "constant":
        params["lam_logit"] = jnp.asarray([np.float32(i.params.get("lam_logit", 0.0)) for i in inits])
    else:
        net = LambdaNet(hidden).init(rng, jnp.zeros((1, x.shape[2])))["params"]
        params["net"] = jax.tree.map(lambda a: jnp.broadcast_to(a, (len(datas),) + a.shape), net)
    n = len(datas[0])          # minibatches drawn with replacement, the same rows for every memory
    order_rng = np.random.default_rng(int(jax.random.randint(rng, (), 0, 2**31 - 1)))
    idx = order_rng.integers(0, n, (steps, batch)).astype(np.int32)
    fitted = _fit_steps(mode, hidden, _adam(float(lr)), params, x,
                        np.stack([d.lm_logp for d in datas]).astype(np.float32),
                        np.stack([d.dists for d in datas]).astype(np.float32),
                        np.stack([d.match for d in datas]), idx, rng)
    fitted = jax.device_get(fitted)
    return [Calibrator(mode, jax.tree.map(lambda a: a[i], fitted), means[i], stds[i], hidden)
            for i in range(len(datas))]
