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


def index_map(key: jax.Array, n_old: int, n_new: int, uniform: bool) -> tuple[jax.Array, jax.Array]:
    """(g `[n_new]` old index of every new unit, divisor c(g) `[n_new]`)."""
    extra = (jnp.arange(n_new - n_old) % n_old if uniform
             else jax.random.randint(key, (n_new - n_old,), 0, n_old))
    g = jnp.concatenate([jnp.arange(n_old), extra]).astype(jnp.int32)
    counts = jnp.bincount(g, length=n_old)
    return g, counts[g].astype(jnp.float32)


def copy(x: jax.Array, g: jax.Array, axis: int) -> jax.Array:
    """Output side / per-unit vectors: new units repeat their source unit."""
    return jnp.take(x, g, axis=axis)


def split(x: jax.Array, g: jax.Array, divisor: jax.Array, axis: int, noise: tuple[jax.Array, float] | None = None,
          n_old: int | None = None) -> jax.Array:
    """Input side: copies divided by how often their source is used; optional ELLE copy noise on new slices."""
    axis = axis % x.ndim
    shape = [1] * x.ndim
    shape[axis] = -1
    y = jnp.take(x, g, axis=axis) / divisor.reshape(shape)
    if noise is not None and noise[1] > 0:
        key, std = noise
        is_new = (jnp.arange(g.shape[0]) >= n_old).astype(y.dtype).reshape(shape)
        y = y + std * jax.random.normal(key, y.shape, y.dtype) * is_new
    return y


def _check(cfg: ModelConfig, new: ModelConfig) -> None:
    if new.head_dim != cfg.head_dim:
        raise ConfigError(f"grow: copy-based growth (method='elle', and BERT) keeps head_dim={cfg.head_dim}; "
                          f"choose n_heads = d_model / {cfg.head_dim}")
    if new.n_heads // new.n_kv_heads != cfg.n_heads // cfg.n_kv_heads:
        raise ConfigError(f"grow: copy-based growth copies whole kv groups, so n_heads/n_kv_heads must stay "
                          f"{cfg.n_heads // cfg.n_kv_heads}")


def grow_copy_width(params: Params, cfg: ModelConfig, new: ModelConfig, keys, *, uniform: bool,
                    noise_std: float = 0.0) -> Params:
    """Widen every tensor with index maps (layers: one fresh head/FFN map each); depth is done already."""
    _check(cfg, new)
    d, D = cfg.d_model, new.d_model
    gD, cD = index_map(keys(), d, D, uniform)
    noise_key = keys()

    def noisy(i):      # independent copy noise per split site
        return (jax.random.fold_in(noise_key, i), noise_std)

    def norm(p, divide=False):
        out = {k: copy(v, gD, -1) for k, v in p.items()}
        return {k: v / cD for k, v in out.items()} if divide else out

    out: Params = {"embed": {"embedding": copy(params["embed"]["embedding"], gD, 1)}}
    for name in ("pos_embed", "type_embed"):
        if name in params:
            out[name] = {"embedding": copy(params[name]["embedding"], gD, 1)}
    for name in ("embed_norm", "final_norm"):
        if name in params:
            out[name] = norm(params[name])
    if "lm_head" in params:
        out["lm_head"] = {"kernel": split(params["lm_head"]["kernel"], gD, cD, 0, noisy(0), d)}
    if "mlm_dense" in params:     # BERT MLM head: dense D->D, then a norm divided by c so tied logits add up
        out["mlm_dense"] = {"kernel": copy(split(params["mlm_dense"]["kernel"], gD, cD, 0, noisy(1), d), gD, 1),
                            "bias": copy(params["mlm_dense"]["bias"], gD, 0)}
        out["mlm_norm"] = norm(params["mlm_norm"], divide=True)
        out["mlm_bias"] = params["mlm_bias"]
    if "pooler" in params:
        out["pooler"] = {"kernel": copy(split(params["pooler"]["kernel"], gD, cD, 0, noisy(2), d), gD, 1),
                         "bias": copy(params["pooler"]["bias"], gD, 0)}

    layer_keys = jax.random.split(keys(), new.n_layers)

    def widen_layer(layer: Params, key: jax.Array, index: jax.Array) -> Params:
        k_heads, k_ffn, k_noise = jax.random.split(key, 3)
        group = cfg.n_heads // cfg.n_kv_heads
        gK, cK = index_map(k_heads, cfg.n_kv_heads, new.n_kv_heads, uniform)     # whole kv groups
        gH = (gK[:, None] * group + jnp.arange(group)[None, :]).reshape(-1)       # q heads follow their group
        cH = jnp.repeat(cK, group)
        gF, cF = index_map(k_ffn, cfg.d_ff, new.d_ff, uniform)

        def site(i):
            return (jax.random.fold_in(k_noise, i), noise_std)

        attn, new_attn = layer["attn"], {}
        for i, (name, g) in enumerate((("q", gH), ("k", gK), ("v", gK))):
            new_attn[name] = {"kernel": copy(split(attn[name]["kernel"], gD, cD, 0, site(i), d), g, 1)}
            if "bias" in attn[name]:
                new_attn[name]["bias"] = copy(attn[name]["bias"], g, 0)
        o = split(attn["o"]["kernel"], gH, cH, 0, site(3), cfg.n_heads)          # [H', hd, d]
        new_attn["o"] = {"kernel": copy(o, gD, 2)}
        if "bias" in attn["o"]:
            new_attn["o"]["bias"] = copy(attn["o"]["bias"], gD, 0)
        mlp, new_mlp = layer["mlp"], {}
        for i, name in enumerate(("wi", "wg"), start=4):
            if name in mlp:
                new_mlp[name] = {"kernel": copy(split(mlp[name]["kernel"], gD, cD, 0, site(i), d), gF, 1)}
                if "bias" in mlp[name]:
                    new_mlp[name]["bias"] = copy(mlp[name]["bias"], gF, 0)
        new_mlp["wo"] = {"kernel": copy(split(mlp["wo"]["kernel"], gF, cF, 0, site(6), cfg.d_ff), gD, 1)}
        if "bias" in mlp["wo"]:
            new_mlp["wo"]["bias"] = copy(mlp["wo"]["bias"], gD, 0)
        return {"attn": new_attn, "mlp": new_mlp, "attn_norm": norm(layer["attn_norm"]),
                "mlp_norm": norm(layer["mlp_norm"])}

    out["layers"] = jax.vmap(widen_layer)(params["layers"], layer_keys, jnp.arange(new.n_layers))
    return out
