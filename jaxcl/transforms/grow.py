"""Model growth as a pure parameter-tree transform: wider (d_model, heads, kv heads, d_ff) and deeper.

    new_params, new_cfg = grow(params, cfg, d_model=768, n_heads=12, n_layers=12, rng=jax.random.key(0))

`method="exact"` is function preserving for the pre-norm decoders (GPT-2 LayerNorm, LLaMA RMSNorm)
at any target width and depth: logits agree to float32 round-off. The construction:

* residual stream d -> D: new coordinates carry the mean of the old ones (LayerNorm) or zero
  (RMSNorm). Every write into the stream (token/position embeddings, attention and MLP outputs and
  their biases) gets new output columns equal to its row mean (LayerNorm) or zero (RMSNorm), so the
  invariant holds after every layer. The norm then sees the same mean and a variance (or mean
  square) scaled by d/D: old scales are multiplied by sqrt(d/D), epsilon by d/D, and new scale /
  bias entries produce zeros. Input-side weights of new coordinates multiply those zeros, so they
  are free: they are drawn at random, so the model can use the new width once it moves.
* new heads and FFN units: random input-side weights, zero output-side rows.
* head_dim (GPT-2, where it is d_model / n_heads): new q/v dims are random, new k dims zero, new
  o rows zero, and q is rescaled by sqrt(head_dim'/head_dim) so the 1/sqrt(head_dim) softmax scale
  is unchanged. LLaMA keeps head_dim (RoPE frequencies depend on it) and records it explicitly.
* grouped-query attention: old q heads keep reading the same keys/values; kv heads are duplicated
  where the new groups are smaller, which is exact when the new group size divides the old one.
* depth: ELLE's scheme of duplicating layers and inserting each copy directly above its source,
  sweeping through the layers without replacement; the copy's attention and MLP output projections
  are zeroed, so the inserted block is the identity on the residual stream.

Everything is jnp on plain dicts with static shapes, so `grow` jits (including with the grown
model's `out_shardings`) and works on any Flax/NNX state laid out like `jaxcl.models`.

`grow_importance` carries a per-coordinate tree (a diagonal Fisher, for EWC across growth) through the
same growth: every grown coordinate takes its source's value, and coordinates with no single source get 0.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxcl.models.config import ConfigError, ModelConfig

Params = dict[str, Any]
METHODS = ("exact", "elle")


# ----------------------------------------------------------------------------- targets
def grown_config(cfg: ModelConfig, *, d_model: int | None = None, n_heads: int | None = None,
                 n_kv_heads: int | None = None, d_ff: int | None = None, n_layers: int | None = None,
                 method: str = "exact", allow_inexact: bool = False) -> ModelConfig:
    """The config of the grown model; raises `ConfigError` naming the target that cannot be reached.

    `method="exact"` promises the same function. For the post-LN BERT encoder that holds only when the
    new d_model is an integer multiple of the old one (copied coordinates keep the LayerNorm statistics)
    and no layer is added (an added post-LN layer re-normalises the stream): anything else is an error
    unless `allow_inexact=True` (then the deviation is the caller's to measure); `method="elle"` is
    ELLE's own, inexact scheme.
    """
    if method not in METHODS:
        raise ConfigError(f"grow: method={method!r} is not one of {METHODS}")
    D = cfg.d_model if d_model is None else d_model
    H = cfg.n_heads if n_heads is None else n_heads
    L = cfg.n_layers if n_layers is None else n_layers
    F = cfg.d_ff if d_ff is None else d_ff
    if n_kv_heads is None:   # MHA stays MHA; GQA keeps its group size where it can
        n_kv_heads = H if cfg.n_kv_heads == cfg.n_heads else max(cfg.n_kv_heads, H * cfg.n_kv_heads // cfg.n_heads)
    K = n_kv_heads
    for name, new, old in (("d_model", D, cfg.d_model), ("n_heads", H, cfg.n_heads), ("n_kv_heads", K, cfg.n_kv_heads),
                           ("d_ff", F, cfg.d_ff), ("n_layers", L, cfg.n_layers)):
        if not isinstance(new, int) or new < old:
            raise ConfigError(f"grow: {name}={new} would shrink the model (currently {old}); growth only adds")
    if H % K:
        raise ConfigError(f"grow: n_kv_heads={K} does not divide n_heads={H}")
    if cfg.family == "llama":
        head_dim = cfg.head_dim              # RoPE frequencies depend on head_dim: keep it
    else:
        if D % H:
            raise ConfigError(f"grow: n_heads={H} does not divide d_model={D}")
        head_dim = D // H
        if head_dim < cfg.head_dim:
            raise ConfigError(f"grow: head_dim would shrink from {cfg.head_dim} to {head_dim} "
                              f"(d_model={D} / n_heads={H}); use at most {D // cfg.head_dim} heads")
    if method == "exact" and cfg.is_decoder:
        old_group, new_group = cfg.n_heads // cfg.n_kv_heads, H // K
        if old_group % new_group:
            raise ConfigError(f"grow(method='exact'): the new kv group size n_heads/n_kv_heads={new_group} must "
                              f"divide the old one ({old_group}) so every old head keeps its keys and values")
    if method == "exact" and not cfg.is_decoder and not allow_inexact:
        why = []
        if D % cfg.d_model:
            why.append(f"d_model={D} is not an integer multiple of {cfg.d_model} (try "
                       f"d_model={cfg.d_model * (D // cfg.d_model + 1)})")
        if L != cfg.n_layers:
            why.append(f"n_layers={L} adds layers, and an added post-LN layer re-normalises the stream "
                       "even with zeroed output projections")
        if why:
            raise ConfigError(f"grow(method='exact') cannot preserve the function of a post-LN {cfg.family} model: "
                              f"{'; '.join(why)}. Use method='elle' (ELLE's inexact scheme) or pass allow_inexact=True")
    norm_eps = cfg.norm_eps * cfg.d_model / D if cfg.is_decoder and method == "exact" else cfg.norm_eps
    return cfg.replace(d_model=D, n_heads=H, n_kv_heads=K, d_ff=F, n_layers=L, head_dim=head_dim, norm_eps=norm_eps)


# ----------------------------------------------------------------------------- depth plan
def duplication_counts(n_layers: int, n_added: int, rng: jax.Array,
                       sources: Sequence[int] | None = None) -> jax.Array:
    """How many copies of each old layer to insert above it: `[n_layers]` int32 summing to `n_added`.

    ELLE sweeps without replacement: every layer is duplicated once before any layer twice. With
    `sources` (old layer indices), the caller fixes the choice (e.g. ELLE's cross-stage candidates).
    """
    return _sweep_counts(n_layers, n_added, jax.random.normal(rng, (n_layers,)), sources)


def _sweep_counts(n_layers: int, n_added: int, scores: jax.Array, sources: Sequence[int] | None) -> jax.Array:
    """`duplication_counts` with the random order given as scores (the lowest-scored layers go first)."""
    if sources is not None:
        if len(sources) != n_added or any(not 0 <= s < n_layers for s in sources):
            raise ConfigError(f"grow: depth sources {list(sources)} must be {n_added} indices in [0, {n_layers})")
        return jnp.bincount(jnp.asarray(sources, jnp.int32), length=n_layers).astype(jnp.int32)
    full, rest = divmod(n_added, n_layers)
    chosen = jnp.argsort(scores)[:rest]
    return full + jnp.zeros((n_layers,), jnp.int32).at[chosen].add(1)


def depth_plan(counts: jax.Array, n_new: int) -> tuple[jax.Array, jax.Array]:
    """(source layer of each new position `[n_new]`, whether it is an inserted copy `[n_new]`)."""
    n_old = counts.shape[0]
    source = jnp.repeat(jnp.arange(n_old), 1 + counts, total_repeat_length=n_new)
    first = jnp.concatenate([jnp.zeros((1,), bool), source[1:] == source[:-1]])
    return source, first


# ----------------------------------------------------------------------------- primitives
def _append(x: jax.Array, axis: int, new: jax.Array) -> jax.Array:
    return jnp.concatenate([x, new.astype(x.dtype)], axis=axis)


def _grow_axis(x: jax.Array, axis: int, size: int, fill: str, rand: "_RandomSource | None" = None,
               std: float = 0.0) -> jax.Array:
    """Extend `axis` to `size` with zeros, ones, the mean along that axis, or N(0, std^2) values."""
    axis = axis % x.ndim
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[axis] = extra
    if fill == "zero":
        new = jnp.zeros(shape, x.dtype)
    elif fill == "mean":
        new = jnp.broadcast_to(jnp.mean(x, axis=axis, keepdims=True), shape)
    elif fill == "one":
        new = jnp.ones(shape, x.dtype)
    else:
        new = rand.fill(shape, std)
    return _append(x, axis, new)


class _RandomSource:
    """PRNG keys on demand, and normal draws served from one pooled draw.

    One RNG kernel per growth instead of one per filled tensor: with a threefry kernel per fill,
    compiling even a small growth took seconds. `pool_size=None` records how much is requested
    (run under `jax.eval_shape`); a second source with that size serves the same requests.

    With `transport=True` (`grow_importance`) every draw is made exactly as in the real growth (so index
    maps and depth choices are the same) but `fill` returns zeros: new coordinates carry no importance.
    """

    def __init__(self, rng: jax.Array, pool_size: int | None = None, transport: bool = False):
        self.rng, self.count, self.offset, self.requested, self.transport = rng, 0, 0, 0, transport
        self.pool = None if pool_size is None else jax.random.normal(jax.random.fold_in(rng, 0), (pool_size,))

    def __call__(self) -> jax.Array:
        self.count += 1
        return jax.random.fold_in(self.rng, self.count)

    def normal(self, shape: Sequence[int], std: float) -> jax.Array:
        n = math.prod(shape)
        if self.pool is None:
            self.requested += n
            return jnp.zeros(tuple(shape), jnp.float32)
        out = jax.lax.dynamic_slice_in_dim(self.pool, self.offset, n).reshape(tuple(shape)) * std
        self.offset += n
        return out

    def fill(self, shape: Sequence[int], std: float) -> jax.Array:
        """Values for new coordinates (random fills, copy noise): `normal`, or zeros when transporting."""
        out = self.normal(shape, std)
        return jnp.zeros_like(out) if self.transport else out


# ----------------------------------------------------------------------------- exact growth
def _exact_width(params: Params, cfg: ModelConfig, new: ModelConfig, keys: _RandomSource) -> Params:
    d, D, std = cfg.d_model, new.d_model, cfg.initializer_range
    write = "mean" if cfg.family == "gpt2" else "zero"       # what a residual write puts in new coordinates
    scale, one = math.sqrt(d / D), "one"
    if keys.transport:          # importances: rescaled coordinates keep their source's, new ones get 0
        write, scale, one = "zero", 1.0, "zero"

    def norm(p):
        out = {"scale": _grow_axis(p["scale"] * scale, -1, D, one)}
        if "bias" in p:
            out["bias"] = _grow_axis(p["bias"], -1, D, "zero")
        return out

    def reads(kernel, axis):       # input side of the residual: new rows multiply zeros -> random
        return _grow_axis(kernel, axis, D, "random", keys, std)

    def writes(x):                 # output side into the residual
        return _grow_axis(x, -1, D, write)

    out: Params = {"embed": {"embedding": writes(params["embed"]["embedding"])}}
    for name in ("pos_embed", "prompt_embed"):
        if name in params:
            out[name] = {"embedding": writes(params[name]["embedding"])}
    out["final_norm"] = norm(params["final_norm"])
    if "lm_head" in params:
        out["lm_head"] = {"kernel": reads(params["lm_head"]["kernel"], 0)}

    layers = params["layers"]
    new_layers: Params = {"attn_norm": norm(layers["attn_norm"]), "mlp_norm": norm(layers["mlp_norm"])}
    new_layers["attn"] = _exact_attention(layers["attn"], cfg, new, keys, reads, writes)
    mlp = layers["mlp"]
    new_mlp: Params = {}
    for name in ("wi", "wg"):
        if name in mlp:
            k = _grow_axis(reads(mlp[name]["kernel"], 1), 2, new.d_ff, "random", keys, std)   # [L, D, F']
            new_mlp[name] = {"kernel": k}
            if "bias" in mlp[name]:
                new_mlp[name]["bias"] = _grow_axis(mlp[name]["bias"], -1, new.d_ff, "zero")
    wo = _grow_axis(mlp["wo"]["kernel"], 1, new.d_ff, "zero")                                 # new units: 0
    new_mlp["wo"] = {"kernel": writes(wo)}
    if "bias" in mlp["wo"]:
        new_mlp["wo"]["bias"] = writes(mlp["wo"]["bias"])
    new_layers["mlp"] = new_mlp
    out["layers"] = new_layers
    return out


def _exact_attention(attn: Params, cfg: ModelConfig, new: ModelConfig, keys: _RandomSource, reads, writes) -> Params:
    std = cfg.initializer_range
    H, H2, K2, hd, hd2 = cfg.n_heads, new.n_heads, new.n_kv_heads, cfg.head_dim, new.head_dim
    old_group, new_group = cfg.n_heads // cfg.n_kv_heads, H2 // K2
    q_scale = 1.0 if keys.transport else math.sqrt(hd2 / hd)   # keeps q.k / sqrt(head_dim) unchanged
    out: Params = {}

    # q: [L, d, H, hd] -> [L, D, H2, hd2]
    q = reads(attn["q"]["kernel"], 1) * q_scale
    q = _grow_axis(_grow_axis(q, 2, H2, "random", keys, std), 3, hd2, "random", keys, std)
    out["q"] = {"kernel": q}
    if "bias" in attn["q"]:
        out["q"]["bias"] = _grow_axis(_grow_axis(attn["q"]["bias"] * q_scale, 1, H2, "zero"), 2, hd2, "zero")

    # k, v: old q head h reads kv head h // group. Kv heads that serve old heads copy the old kv
    # head of their group; the rest are new (random).
    n_serving = H // new_group
    serve = (jnp.arange(n_serving) * new_group) // old_group                  # new kv j -> old kv
    for name, new_dims in (("k", "zero"), ("v", "random")):
        kernel = jnp.take(reads(attn[name]["kernel"], 1), serve, axis=2, mode="clip")     # [L, D, n_serving, hd]
        kernel = _grow_axis(kernel, 2, K2, "random", keys, std)
        kernel = _grow_axis(kernel, 3, hd2, new_dims, keys, std)            # new k dims 0: scores unchanged
        out[name] = {"kernel": kernel}
        if "bias" in attn[name]:
            bias = _grow_axis(jnp.take(attn[name]["bias"], serve, axis=1, mode="clip"), 1, K2, "zero")
            out[name]["bias"] = _grow_axis(bias, 2, hd2, "zero")

    # o: [L, H, hd, d] -> [L, H2, hd2, D]; rows of new heads and new head dims are zero.
    o = _grow_axis(_grow_axis(attn["o"]["kernel"], 1, H2, "zero"), 2, hd2, "zero")
    out["o"] = {"kernel": writes(o)}
    if "bias" in attn["o"]:
        out["o"]["bias"] = writes(attn["o"]["bias"])
    return out


OUTPUT_PROJECTIONS = (("attn", "o"), ("mlp", "wo"))


def _insert_layers(layers: Params, counts: jax.Array, n_new: int, zero_copies: bool) -> Params:
    """Stack with each layer followed by its copies (with zeroed output projections if `zero_copies`)."""
    source, is_copy = depth_plan(counts, n_new)
    stacked = jax.tree.map(lambda x: jnp.take(x, source, axis=0, mode="clip"), layers)
    if not zero_copies:
        return stacked
    for block, proj in OUTPUT_PROJECTIONS:
        stacked[block][proj] = jax.tree.map(
            lambda x: jnp.where(is_copy.reshape((-1,) + (1,) * (x.ndim - 1)), 0.0, x), stacked[block][proj])
    return stacked


# ----------------------------------------------------------------------------- entry point
def grow(params: Params, cfg: ModelConfig, *, d_model: int | None = None, n_heads: int | None = None,
         n_kv_heads: int | None = None, d_ff: int | None = None, n_layers: int | None = None,
         rng: jax.Array, method: str = "exact", depth_sources: Sequence[int] | None = None,
         noise_std: float = 0.0, allow_inexact: bool = False) -> tuple[Params, ModelConfig]:
    """Grow `params` of model `cfg` to the target sizes; returns `(new_params, new_cfg)`.

    Targets left as None keep their current value. `depth_sources` fixes which old layers get
    duplicated (default: ELLE's random sweep without replacement). `noise_std` applies only to
    `method="elle"` (ELLE's copy noise). `method="exact"` on a post-LN BERT at a width that is not an
    integer multiple, or with added layers, cannot preserve the function and raises `ConfigError`
    unless `allow_inexact=True`.
    """
    new_cfg, sources = _target(cfg, dict(d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, d_ff=d_ff,
                                         n_layers=n_layers), method, depth_sources, allow_inexact)
    return _compiled_growth(cfg, new_cfg, method, sources, float(noise_std))(params, rng), new_cfg


def _target(cfg: ModelConfig, sizes: dict[str, int | None], method: str, depth_sources: Sequence[int] | None,
            allow_inexact: bool) -> tuple[ModelConfig, tuple[int, ...] | None]:
    """(grown config, validated depth sources) for `grow` and `grow_importance`."""
    new_cfg = grown_config(cfg, **sizes, method=method, allow_inexact=allow_inexact)
    sources = None if depth_sources is None else tuple(int(s) for s in depth_sources)
    if sources is not None:
        _sweep_counts(cfg.n_layers, new_cfg.n_layers - cfg.n_layers, jnp.zeros(cfg.n_layers), sources)  # validate
    return new_cfg, sources


def grow_importance(importance: Params, cfg: ModelConfig, *, d_model: int | None = None,
                    n_heads: int | None = None, n_kv_heads: int | None = None, d_ff: int | None = None,
                    n_layers: int | None = None, rng: jax.Array, method: str = "exact",
                    depth_sources: Sequence[int] | None = None, noise_std: float = 0.0,
                    allow_inexact: bool = False) -> Params:
    """Carry a per-coordinate tree (e.g. EWC's diagonal Fisher, float32, laid out like `params` of `cfg`)
    through the growth that `grow` makes with the same arguments, `rng` included.

    Every grown coordinate that is its old coordinate, a copy of one (duplicated layers, heads, kv
    heads, FFN units, hidden units) or a rescaled or split copy (the exact growth's norm scales and q,
    ELLE's split input sides) takes that source's value unchanged; coordinates with no single source
    (random, zero, one and mean fills, and the exact growth's zeroed output projections of inserted
    layers) get 0. So a non-negative tree stays non-negative. The index maps and depth choices are
    drawn exactly as in `grow` (same draws from `rng`), which is what ties the two together. Used by
    `jaxcl.strategies.ewc` on an ELLE run that grows (the issue's rule: new coordinates are unimportant,
    copies inherit their source's importance). Raises what `grow` raises for an unreachable target.
    """
    new_cfg, sources = _target(cfg, dict(d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, d_ff=d_ff,
                                         n_layers=n_layers), method, depth_sources, allow_inexact)
    return _compiled_growth(cfg, new_cfg, method, sources, float(noise_std), True)(importance, rng)


@functools.lru_cache(maxsize=32)
def _compiled_growth(cfg: ModelConfig, new_cfg: ModelConfig, method: str, sources: tuple[int, ...] | None,
                     noise_std: float, transport: bool = False):
    """The jitted transform for one (model, target, method); cached, so repeated growths skip tracing.
    `transport`: `grow_importance`'s variant (same draws; fills give 0, no rescaling or splitting)."""

    def transform(params: Params, keys: _RandomSource) -> Params:
        counts = _sweep_counts(cfg.n_layers, new_cfg.n_layers - cfg.n_layers, keys.normal((cfg.n_layers,), 1.0),
                               sources)
        # Depth first, so that (for ELLE) every inserted copy is widened with its own head and FFN maps.
        deep = dict(params)
        deep["layers"] = _insert_layers(params["layers"], counts, new_cfg.n_layers, zero_copies=method == "exact")
        if method == "exact" and cfg.is_decoder:
            return _exact_width(deep, cfg, new_cfg, keys)
        # BERT (post-LN) is exact only with uniform maps at integer width multiples; ELLE uses random maps.
        from jaxcl.transforms.grow_elle import grow_copy_width

        return grow_copy_width(deep, cfg, new_cfg, keys, uniform=method == "exact", noise_std=noise_std)

    pool_size: list[int] = []

    def run(params: Params, rng: jax.Array) -> Params:
        if not pool_size:     # first trace: size the random pool abstractly (allocates nothing)
            recorder = _RandomSource(rng)
            jax.eval_shape(lambda p: transform(p, recorder), params)
            pool_size.append(recorder.requested)
        return transform(params, _RandomSource(rng, pool_size[0], transport))

    # One jitted program (op-by-op dispatch of hundreds of small ops is slow); inside a caller's jit it inlines.
    return jax.jit(run)
