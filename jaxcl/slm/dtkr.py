"""DTKR: per-task retrieval keys over frozen sentence-encoder queries (SLM's Dynamic Task-related Knowledge
Retrieval).

A query `q [h]` (mean-pooled frozen-encoder embedding) is cut into `g` contiguous groups of `c = h / g`
channels. Every slot of the pool owns one `c`-dim sub-key per group (`keys [g, P, c]`); a slot's score is
the cosine between query group and sub-key, averaged over groups. Each task trains its own `P_t` slots on
its own texts only (keys started at data means or orthogonal, random score mask, per-group top-2 loss),
then they are frozen and written into the next free slots of the preallocated pool (`slot_task[p]`
records the owner, -1 = free), so the pool's shape never changes and nothing jitted recompiles when a task is added.

Which task a text belongs to (evaluation, no task id) is chosen from the keys (`chosen_task`, `best_keys_task`)
or, with `task_choice="gaussian"`, from per-task query statistics kept next to the keys: each task's mean
query and the pooled within-task covariance (shrunk towards a scaled identity), i.e. linear discriminant
analysis over the frozen queries (`gaussian_task`). Only sums over a task's own training queries are kept
(no text, no query is stored), so it needs no replay. Mahalanobis-distance task/class identification over
frozen features: Lee et al. 2018 (NeurIPS, "A simple unified framework for detecting out-of-distribution
samples"), and in exemplar-free continual learning Goswami et al. 2023 (NeurIPS, FeCAM).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

KEY_AXES = (None, "slots", None)          # logical axes of `keys [groups, slots, channels]`
FREE = -1


@struct.dataclass
class KeyBank:
    """The shared key pool: `keys [g, P_max, c]` and `slot_task [P_max]` (task index, -1 = free).

    Optional task statistics (all None, or all set by `new_key_bank(..., max_tasks=T)`): `task_mean [T, h]`
    (each task's mean training query), `task_count [T]` (queries behind it; 0 = task not added), `scatter
    [h, h]` (pooled within-task scatter Σ_t Σ_i (q_i − μ_t)(q_i − μ_t)ᵀ) and `precision [h, h]` (inverse of
    the shrunk pooled covariance), read by `gaussian_task`.
    """

    keys: jax.Array
    slot_task: jax.Array
    task_mean: jax.Array | None = None
    task_count: jax.Array | None = None
    scatter: jax.Array | None = None
    precision: jax.Array | None = None

    STATISTICS = ("task_mean", "task_count", "scatter", "precision")   # the optional fields, in one place

    @property
    def has_statistics(self) -> bool:
        return self.task_mean is not None

    @property
    def groups(self) -> int:
        return self.keys.shape[0]

    @property
    def max_slots(self) -> int:
        return self.keys.shape[1]

    def task_slots(self, task: int) -> np.ndarray:
        """Indices of the slots `task` owns (empty when it has none)."""
        return np.flatnonzero(np.asarray(self.slot_task) == task)


def new_key_bank(max_slots: int, dim: int, groups: int, max_tasks: int | None = None) -> KeyBank:
    """An empty pool for queries of width `dim` split into `groups` groups; with `max_tasks`, also empty
    task statistics for `task_choice="gaussian"` (`add_task_statistics`)."""
    if dim % groups:
        raise ValueError(f"query width {dim} is not divisible by slm.groups={groups}")
    stats = {}
    if max_tasks is not None:
        stats = dict(task_mean=jnp.zeros((max_tasks, dim), jnp.float32), task_count=jnp.zeros((max_tasks,), jnp.float32),
                     scatter=jnp.zeros((dim, dim), jnp.float32), precision=jnp.eye(dim, dtype=jnp.float32))
    return KeyBank(keys=jnp.zeros((groups, max_slots, dim // groups), jnp.float32),
                   slot_task=jnp.full((max_slots,), FREE, jnp.int32), **stats)


def grouped_cosine(queries: jax.Array, keys: jax.Array) -> jax.Array:
    """Cosine of each query group with each slot's sub-key: queries [n, g*c], keys [g, P, c] -> [n, g, P]."""
    g, _, c = keys.shape
    if queries.shape[-1] != g * c:
        raise ValueError(f"queries have width {queries.shape[-1]}, keys expect {g} groups x {c} channels")
    qg = queries.reshape(queries.shape[0], g, c).astype(jnp.float32)
    qn = qg / jnp.maximum(jnp.linalg.norm(qg, axis=-1, keepdims=True), 1e-8)
    kn = keys / jnp.maximum(jnp.linalg.norm(keys, axis=-1, keepdims=True), 1e-8)
    return jnp.einsum("ngc,gpc->ngp", qn, kn)


def retrieve(queries: jax.Array, keys: jax.Array, allowed: jax.Array, top_k: int,
             per_example: bool = True) -> tuple[jax.Array, jax.Array]:
    """Top-K allowed slots and their weights `similarity / Σ similarity` (constants, no gradient).

    queries [n, h], keys [g, P, c], allowed bool [P] (or [G, P]: a slot set per output row) ->
    (slots int32 [G, K], weights [G, K]) with G = n (per-example retrieval) or G = 1 (batch-level, as
    the official code: scores averaged over the batch).
    """
    scores = jax.lax.stop_gradient(grouped_cosine(queries, keys)).mean(axis=1)          # [n, P]
    if not per_example:
        scores = scores.mean(axis=0, keepdims=True)                                   # [1, P]
    if allowed.ndim == 2 and allowed.shape[0] not in (1, scores.shape[0]):
        raise ValueError(f"allowed has {allowed.shape[0]} rows; retrieval produces {scores.shape[0]}")
    scores = jnp.where(allowed if allowed.ndim == 2 else allowed[None, :], scores, -100.0)
    vals, slots = jax.lax.top_k(scores, top_k)
    # Cosines can be negative; clip so weights stay a convex combination (the official code assumes > 0).
    vals = jnp.maximum(vals, 1e-6)
    return slots.astype(jnp.int32), vals / vals.sum(axis=-1, keepdims=True)


def key_loss(keys: jax.Array, queries: jax.Array, rng: jax.Array, mask_prob: float, top_k: int = 2) -> jax.Array:
    """SLM's key loss: −mean cosine of each (query, group)'s top-k sub-keys after a random score mask.

    The random mask (scores set to −100 with probability `mask_prob`) lets non-maximal keys win now and
    then, so the task's keys spread over its queries instead of collapsing onto one.
    """
    sim = grouped_cosine(queries, keys)                                                 # [n, g, P_t]
    masked = jnp.where(jax.random.bernoulli(rng, mask_prob, sim.shape), -100.0, jax.lax.stop_gradient(sim))
    _, idx = jax.lax.top_k(masked, min(top_k, keys.shape[1]))                           # [n, g, k]
    return -jnp.mean(jnp.take_along_axis(sim, idx, axis=-1))


def orthogonal_keys(rng: jax.Array, groups: int, slots: int, channels: int) -> jax.Array:
    """Per-group orthogonal `[slots, channels]` sub-keys (the official default init) -> [g, slots, c]."""
    init = jax.nn.initializers.orthogonal()
    return jnp.stack([init(k, (slots, channels), jnp.float32) for k in jax.random.split(rng, groups)])


def data_mean_keys(rng: jax.Array, queries: np.ndarray, groups: int, slots: int) -> jax.Array:
    """Keys at the means of `slots` random disjoint subsets of the task's queries (the official
    `group_avg_initialization`) -> [g, slots, c]. Starts every key inside the task's region of query
    space, which matters when a task has few texts and key training runs only a few steps."""
    n, dim = queries.shape
    order = np.asarray(jax.random.permutation(rng, n))
    means = np.stack([queries[part].mean(axis=0) for part in np.array_split(order, slots) if len(part)]
                     or [queries.mean(axis=0)])
    means = np.concatenate([means, np.repeat(means[-1:], slots - len(means), axis=0)])   # n < slots
    return jnp.asarray(means.reshape(slots, groups, dim // groups).transpose(1, 0, 2))


def train_task_keys(queries: np.ndarray, rng: jax.Array, *, groups: int, slots: int, epochs: int = 3,
                    batch_size: int = 16, lr: float = 1e-3, weight_decay: float = 0.01, clip_norm: float = 0.1,
                    mask_prob: float = 0.2, top_k: int = 2, init: str = "orthogonal") -> tuple[jax.Array, list[float]]:
    """Train one task's `[g, slots, c]` keys on that task's queries only; returns (keys, loss per epoch).

    `init`: "orthogonal" (the official default) or "data_mean" (`data_mean_keys`). AdamW with
    global-norm clipping and the learning rate divided by 10 every 2 epochs (official recipe).
    """
    queries = np.asarray(queries, np.float32)
    n, dim = queries.shape
    if n == 0:
        raise ValueError("cannot train retrieval keys on an empty task (0 training texts)")
    if dim % groups:
        raise ValueError(f"query width {dim} is not divisible by slm.groups={groups}")
    init_rng, rng = jax.random.split(rng)
    if init == "orthogonal":
        keys = orthogonal_keys(init_rng, groups, slots, dim // groups)
    elif init == "data_mean":
        keys = data_mean_keys(init_rng, queries, groups, slots)
    else:
        raise ValueError(f"slm.key_init={init!r}: choose 'orthogonal' or 'data_mean'")
    batch_size = min(batch_size, n)
    per_epoch = max(1, n // batch_size)
    tx = _key_optimizer(lr, 2 * per_epoch, weight_decay, clip_norm)
    opt_state = tx.init(keys)
    history = []
    for epoch in range(epochs):
        order = np.asarray(jax.random.permutation(jax.random.fold_in(rng, epoch), n))
        losses = []
        for b in range(per_epoch):
            batch = jnp.asarray(queries[order[b * batch_size:(b + 1) * batch_size]])
            step_rng = jax.random.fold_in(rng, epoch * per_epoch + b + 1)
            keys, opt_state, loss = _key_step(keys, opt_state, batch, step_rng, tx=tx, mask_prob=mask_prob,
                                              top_k=top_k)
            losses.append(float(loss))
        history.append(float(np.mean(losses)))
    return keys, history


@functools.lru_cache(maxsize=32)
def _key_optimizer(lr: float, decay_every: int, weight_decay: float, clip_norm: float) -> optax.GradientTransformation:
    """One optimizer object per setting, so the jitted key step is compiled once per shape, not per task."""
    schedule = optax.exponential_decay(lr, transition_steps=decay_every, decay_rate=0.1, staircase=True)
    return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(schedule, weight_decay=weight_decay))


@functools.partial(jax.jit, static_argnames=("tx", "mask_prob", "top_k"))
def _key_step(keys, opt_state, batch, rng, *, tx, mask_prob, top_k):
    loss, grad = jax.value_and_grad(key_loss)(keys, batch, rng, mask_prob, top_k)
    updates, opt_state = tx.update(grad, opt_state, keys)
    return optax.apply_updates(keys, updates), opt_state, loss


def add_task_keys(bank: KeyBank, task: int, task_keys: jax.Array) -> tuple[KeyBank, np.ndarray]:
    """Write a trained task's keys into the next free slots (frozen from now on); returns (bank, slots).

    Raises if the task already owns slots (a task added twice) or the pool has no room left.
    """
    if len(bank.task_slots(task)):
        raise ValueError(f"task {task} already owns key slots {bank.task_slots(task).tolist()}; "
                         f"a task can be added only once")
    g, n_new, c = task_keys.shape
    if (g, c) != (bank.groups, bank.keys.shape[2]):
        raise ValueError(f"task keys have shape {tuple(task_keys.shape)}, the pool expects [{bank.groups}, P_t, "
                         f"{bank.keys.shape[2]}]")
    free = np.flatnonzero(np.asarray(bank.slot_task) == FREE)
    if len(free) < n_new:
        raise ValueError(f"the key pool has {len(free)} free slots, task {task} needs {n_new} "
                         f"(raise slm.max_tasks)")
    slots = free[:n_new]
    keys, owners = np.array(bank.keys), np.array(bank.slot_task)       # host-side edit: no compiles per task
    keys[:, slots] = np.asarray(task_keys)
    owners[slots] = task
    return bank.replace(keys=jnp.asarray(keys), slot_task=jnp.asarray(owners)), slots


def add_task_statistics(bank: KeyBank, task: int, queries: np.ndarray, shrinkage: float) -> KeyBank:
    """Add task `task`'s query statistics (its mean, its scatter into the pooled one) and refresh the precision.

    queries [n, h]: the task's own training queries (n >= 1). The pooled covariance is
    `scatter / (N − T)` over the N queries of the T tasks added so far, shrunk as
    `(1 − shrinkage) · C + shrinkage · (tr C / h) · I` (Ledoit-Wolf style towards a scaled identity, so it
    stays invertible with fewer queries than dimensions); `precision` is its inverse, computed on the host in
    float64. Raises on a bank without statistics, a task added twice, an empty task, a width mismatch or a
    shrinkage outside (0, 1].
    """
    if not bank.has_statistics:
        raise ValueError("this key bank keeps no task statistics: make it with new_key_bank(..., max_tasks=T)")
    if not 0.0 < shrinkage <= 1.0:
        raise ValueError(f"slm.gaussian_shrinkage={shrinkage} must be in (0, 1]")
    queries = np.asarray(queries, np.float64)
    counts = np.array(bank.task_count, np.float64)
    if not 0 <= task < len(counts):
        raise ValueError(f"task index {task} is outside the bank's {len(counts)} task statistics (slm.max_tasks)")
    if counts[task] > 0:
        raise ValueError(f"task {task} already has query statistics; a task can be added only once")
    if queries.ndim != 2 or queries.shape[0] == 0 or queries.shape[1] != bank.scatter.shape[0]:
        raise ValueError(f"task {task}'s queries have shape {queries.shape}; need [n >= 1, {bank.scatter.shape[0]}]")
    mean = queries.mean(axis=0)
    centred = queries - mean
    scatter = np.asarray(bank.scatter, np.float64) + centred.T @ centred
    counts[task] = len(queries)
    dim = scatter.shape[0]
    cov = scatter / max(counts.sum() - np.count_nonzero(counts), 1.0)
    scale = np.trace(cov) / dim
    cov = (1.0 - shrinkage) * cov + shrinkage * (scale if scale > 0 else 1.0) * np.eye(dim)
    means = np.array(bank.task_mean)
    means[task] = mean
    return bank.replace(task_mean=jnp.asarray(means, jnp.float32), task_count=jnp.asarray(counts, jnp.float32),
                        scatter=jnp.asarray(scatter, jnp.float32),
                        precision=jnp.asarray(np.linalg.inv(cov), jnp.float32))


def gaussian_task(queries: jax.Array, bank: KeyBank, per_example: bool, n_tasks: int) -> jax.Array:
    """The task whose query Gaussian (own mean, pooled covariance) is most likely -> task int32 [G].

    queries [n, h]. Score of task t: `(q − c)ᵀ P (μ_t − c) − ½ (μ_t − c)ᵀ P (μ_t − c)` with c the mean of the
    task means (−½ the Mahalanobis distance up to a term that is the same for every task; equal priors).
    G = n, or 1 with the scores averaged over the batch. Tasks without statistics are never chosen. Raises
    when the bank keeps no statistics.
    """
    if not bank.has_statistics:
        raise ValueError("slm.task_choice='gaussian' needs the task statistics (new_key_bank(..., max_tasks=T) and "
                         "add_task_statistics per task)")
    present = bank.task_count[:n_tasks] > 0                                             # [T]
    means = bank.task_mean[:n_tasks]                                                    # [T, h]
    # Centred on the mean of the present tasks' means (scores shift by a per-query constant only), and full
    # float32 matmuls (not TF32 / one bf16 pass on accelerators): the precision entries are large (~1/shrinkage)
    # and the score is a difference of two such products.
    centre = jnp.sum(jnp.where(present[:, None], means, 0.0), axis=0) / jnp.maximum(present.sum(), 1)
    means = means - centre
    highest = jax.lax.Precision.HIGHEST
    projected = jnp.matmul(means, bank.precision, precision=highest)                   # [T, h]
    scores = (jnp.matmul(queries.astype(jnp.float32) - centre, projected.T, precision=highest)
              - 0.5 * jnp.sum(projected * means, axis=-1))                             # [n, T]
    if not per_example:
        scores = scores.mean(axis=0, keepdims=True)
    scores = jnp.where(present[None, :], scores, -jnp.inf)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def chosen_task(slots: jax.Array, weights: jax.Array, slot_task: jax.Array, n_tasks: int) -> jax.Array:
    """The task whose retrieved slots carry the most weight: slots/weights [G, K] -> task int32 [G]."""
    owners = slot_task[slots]                                                           # [G, K]
    votes = jnp.sum(jax.nn.one_hot(owners, n_tasks) * weights[..., None], axis=1)        # [G, n_tasks]
    return jnp.argmax(votes, axis=-1).astype(jnp.int32)


def best_keys_task(queries: jax.Array, bank: KeyBank, top_k: int, per_example: bool, n_tasks: int) -> jax.Array:
    """The task whose own top-K keys are, on average, most similar to the query -> task int32 [G].

    Unlike the weight vote of the global top-K (`chosen_task`), every task is judged on the same
    number of its own keys, so one stray key of a neighbouring task cannot outvote a task whose keys
    all fit the text. A task with no slots is never chosen.
    """
    scores = grouped_cosine(queries, bank.keys).mean(axis=1)                            # [n, P]
    if not per_example:
        scores = scores.mean(axis=0, keepdims=True)                                     # [1, P]
    owns = bank.slot_task[None, :] == jnp.arange(n_tasks)[:, None]                      # [T, P]
    per_task = jnp.where(owns[None], scores[:, None, :], -jnp.inf)                      # [G, T, P]
    k = min(top_k, bank.max_slots)
    top = jax.lax.top_k(per_task, k)[0]                                                 # [G, T, k]
    count = jnp.minimum(owns.sum(axis=1), k)                                            # [T] keys averaged
    total = jnp.where(jnp.isfinite(top), top, 0.0).sum(axis=-1)
    mean = jnp.where(count > 0, total / jnp.maximum(count, 1), -jnp.inf)                # [G, T]
    return jnp.argmax(mean, axis=-1).astype(jnp.int32)


TASK_CHOICES = ("vote", "best_keys", "gaussian")


def retrieve_from_text(queries: jax.Array, bank: KeyBank, top_k: int, per_example: bool, n_tasks: int,
                       mix: str = "global", task_choice: str = "vote") -> tuple[jax.Array, jax.Array, jax.Array]:
    """Evaluation-time retrieval from the query alone: (slots [G, K], weights [G, K], chosen task [G]).

    The task: `task_choice="vote"`, the weight vote of the global top-K (`chosen_task`); `"best_keys"`,
    the task whose own top-K keys score highest on average (`best_keys_task`); `"gaussian"`, the most likely
    task under the per-task query Gaussians (`gaussian_task`). `mix="global"`: the
    top-K of every learned slot (the paper). `mix="task"`: the top-K among the chosen task's slots
    only, so a text whose task is right gets exactly the kind of mixture its task was trained with (no
    other task's increment in it).
    """
    if mix not in ("global", "task"):
        raise ValueError(f"slm.mix={mix!r}: choose 'global' or 'task'")
    if task_choice not in TASK_CHOICES:
        raise ValueError(f"slm.task_choice={task_choice!r}: choose one of {TASK_CHOICES}")
    if task_choice == "vote" or mix == "global":          # the global top-K is needed
        slots, weights = retrieve(queries, bank.keys, bank.slot_task != FREE, top_k, per_example)
    if task_choice == "vote":
        task = chosen_task(slots, weights, bank.slot_task, n_tasks)
    elif task_choice == "best_keys":
        task = best_keys_task(queries, bank, top_k, per_example, n_tasks)
    else:
        task = gaussian_task(queries, bank, per_example, n_tasks)
    if mix == "task":
        slots, weights = retrieve(queries, bank.keys, bank.slot_task[None, :] == task[:, None], top_k, per_example)
    return slots, weights, task


__all__ = ["KeyBank", "KEY_AXES", "FREE", "new_key_bank", "grouped_cosine", "retrieve", "key_loss",
           "orthogonal_keys", "data_mean_keys", "train_task_keys", "add_task_keys", "add_task_statistics", "chosen_task",
           "best_keys_task", "gaussian_task",
           "TASK_CHOICES", "retrieve_from_text"]
