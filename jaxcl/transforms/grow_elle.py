"""Copy/split width growth with index maps: ELLE's scheme, and exact BERT growth at integer multiples.

An index map g sends each new unit to an old one (identity on old units; new units pick an old
unit at random, or in order for `uniform` maps), and c(j) counts how often old unit j is used.
Output sides COPY (`take(x, g)`); input sides SPLIT (`take(x, g) / c(g)`), so duplicated inputs add
back to the original. ELLE draws one hidden map per expansion (shared by every tensor, so the
residual stream stays consistent) and a fresh head map and FFN map for every layer; heads are
copied whole and head_dim is fixed. Norm parameters are copied without correction, which is exact
only when every unit is duplicated equally often (`uniform` maps at D' = k·D): that is what makes
BERT (post-LN) growth exact at integer width multiples, and why ELLE's random maps are approximate.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxcl.models.config import ConfigError, ModelConfig

Params = dict[str, Any]


def index_map(rand, n_old: int, n_new: int, uniform: bool) -> tuple[jax.Array, jax.Array]:
    """(g `[n_new]` old index of every new unit, divisor c(g) `[n_new]`); `rand` serves normal draws.
    When `rand.transport` (`grow_importance`) the divisor is 1: a split copy keeps its source's value."""
    if uniform:
        extra = jnp.arange(n_new - n_old) % n_old
    else:    # uniform choice among old units, from standard normals through their CDF
        u = jax.scipy.special.ndtr(rand.normal((n_new - n_old,), 1.0))
        extra = jnp.minimum((u * n_old).astype(jnp.int32), n_old - 1)
    g = jnp.concatenate([jnp.arange(n_old), extra]).astype(jnp.int32)
    counts = jnp.bincount(g, length=n_old)
    if rand.transport:
        return g, jnp.ones((n_new,), jnp.float32)
    return g, counts[g].astype(jnp.float32)


def copy(x: jax.Array, g: jax.Array, axis: int) -> jax.Array:
    """Output side / per-unit vectors: new units repeat their source unit."""
    return jnp.take(x, g, axis=axis, mode="clip")


def split(x: jax.Array, g: jax.Array, divisor: jax.Array, axis: int, rand=None, noise_std: float = 0.0) -> jax.Array:
    """Input side: copies divided by how often their source is used; ELLE's copy noise on the new slices."""
    axis = axis % x.ndim
    shape = [1] * x.ndim
    shape[axis] = -1
    y = jnp.take(x, g, axis=axis, mode="clip") / divisor.reshape(shape)
    n_old = x.shape[axis]
    if noise_std > 0 and g.shape[0] > n_old:
        old, new = jnp.split(y, [n_old], axis=axis)
        y = jnp.concatenate([old, new + rand.fill(new.shape, noise_std)], axis=axis)
    return y


def _check(cfg: ModelConfig, new: ModelConfig) -> None:
    if new.head_dim != cfg.head_dim:
        raise ConfigError(f"grow: copy-based growth (method='elle', and BERT) keeps head_dim={cfg.head_dim}; "
                          f"choose n_heads = d_model / {cfg.head_dim}")
    if new.n_heads // new.n_kv_heads != cfg.n_heads // cfg.n_kv_heads:
        raise ConfigError(f"grow: copy-based growth copies whole kv groups, so n_heads/n_kv_heads must stay "
                          f"{cfg.n_heads // cfg.n_kv_heads}")


def grow_copy_width(params: Params, cfg: ModelConfig, new: ModelConfig, rand, *, uniform: bool,
                    noise_std: float = 0.0) -> Params:
    """Widen every tensor with index maps (layers: one fresh head/FFN map each); depth is done already.

    `rand` is grow's pooled random source; each layer gets its own pooled source from a per-layer key.
    """
    from jaxcl.transforms.grow import _RandomSource

    _check(cfg, new)
    d, D = cfg.d_model, new.d_model
    gD, cD = index_map(rand, d, D, uniform)
    noisy = dict(rand=rand, noise_std=noise_std)

    def norm(p, divide=False):
        out = {k: copy(v, gD, -1) for k, v in p.items()}
        return {k: v / cD for k, v in out.items()} if divide else out

    out: Params = {"embed": {"embedding": copy(params["embed"]["embedding"], gD, 1)}}
    for name in ("pos_embed", "type_embed", "prompt_embed"):
        if name in params:
            out[name] = {"embedding": copy(params[name]["embedding"], gD, 1)}
    for name in ("embed_norm", "final_norm"):
        if name in params:
            out[name] = norm(params[name])
    if "lm_head" in params:
        out["lm_head"] = {"kernel": split(params["lm_head"]["kernel"], gD, cD, 0, **noisy)}
    if "mlm_dense" in params:     # BERT MLM head: dense D->D, then a norm divided by c so tied logits add up
        out["mlm_dense"] = {"kernel": copy(split(params["mlm_dense"]["kernel"], gD, cD, 0, **noisy), gD, 1),
                            "bias": copy(params["mlm_dense"]["bias"], gD, 0)}
        # Tied output: copied embedding columns are summed c times, so the norm divides by c. An untied
        # lm_head is already SPLIT (divided) above: dividing the norm too would scale logits by 1/c.
        out["mlm_norm"] = norm(params["mlm_norm"], divide="lm_head" not in params)
        out["mlm_bias"] = params["mlm_bias"]
    if "pooler" in params:
        out["pooler"] = {"kernel": copy(split(params["pooler"]["kernel"], gD, cD, 0, **noisy), gD, 1),
                         "bias": copy(params["pooler"]["bias"], gD, 0)}

    layer_keys = jax.random.split(rand(), new.n_layers)
    layer_pool: list[int] = []

    def widen_layer(layer: Params, key: jax.Array) -> Params:
        if not layer_pool:      # size this layer's random pool on the first trace
            recorder = _RandomSource(key)
            jax.eval_shape(lambda lay: _widen_layer(lay, recorder), layer)
            layer_pool.append(recorder.requested)
        return _widen_layer(layer, _RandomSource(key, layer_pool[0], rand.transport))

    def _widen_layer(layer: Params, layer_rand) -> Params:
        group = cfg.n_heads // cfg.n_kv_heads
        gK, cK = index_map(layer_rand, cfg.n_kv_heads, new.n_kv_heads, uniform)    # whole kv groups
        gH = (gK[:, None] * group + jnp.arange(group)[None, :]).reshape(-1)       # q heads follow their group
        cH = jnp.repeat(cK, group)
        gF, cF = index_map(layer_rand, cfg.d_ff, new.d_ff, uniform)
        site = dict(rand=layer_rand, noise_std=noise_std)

        attn, new_attn = layer["attn"], {}
        for name, g in (("q", gH), ("k", gK), ("v", gK)):
            new_attn[name] = {"kernel": copy(split(attn[name]["kernel"], gD, cD, 0, **site), g, 1)}
            if "bias" in attn[name]:
                new_attn[name]["bias"] = copy(attn[name]["bias"], g, 0)
        o = split(attn["o"]["kernel"], gH, cH, 0, **site)          # [H', hd, d]
        new_attn["o"] = {"kernel": copy(o, gD, 2)}
        if "bias" in attn["o"]:
            new_attn["o"]["bias"] = copy(attn["o"]["bias"], gD, 0)
        mlp, new_mlp = layer["mlp"], {}
        for name in ("wi", "wg"):
            if name in mlp:
                new_mlp[name] = {"kernel": copy(split(mlp[name]["kernel"], gD, cD, 0, **site), gF, 1)}
                if "bias" in mlp[name]:
                    new_mlp[name]["bias"] = copy(mlp[name]["bias"], gF, 0)
        new_mlp["wo"] = {"kernel": copy(split(mlp["wo"]["kernel"], gF, cF, 0, **site), gD, 1)}
        if "bias" in mlp["wo"]:
            new_mlp["wo"]["bias"] = copy(mlp["wo"]["bias"], gD, 0)
        return {"attn": new_attn, "mlp": new_mlp, "attn_norm": norm(layer["attn_norm"]),
                "mlp_norm": norm(layer["mlp_norm"])}

    out["layers"] = jax.vmap(widen_layer)(params["layers"], layer_keys)
    return out
