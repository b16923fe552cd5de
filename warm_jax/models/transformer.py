"""A decoder-only transformer of the Llama/Gemma family, as a Flax linen module.

RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU MLP, optional tied
embeddings; two heads on one backbone (next-token logits, and a scalar reward read at each
sequence's last real token); incremental decoding with an explicit KV cache.

Parameters are plain pytrees. Every parameter is created with logical axis names (`vocab`,
`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `norm`) which `warm_jax.sharding` maps onto a
device mesh.

Masking works on *slots* and *segments*: a query in slot i of segment s attends to keys in slots
j <= i of the same segment s != 0. Segment 0 is padding. RoPE reads `positions`, which are
independent of slots, so left-padded prompts and packed documents both rotate correctly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Gated-MLP activations; "gelu_tanh" is PyTorch's gelu(approximate="tanh"), Gemma's activation.
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int = 512
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    d_ff: int = 192
    max_len: int = 256
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    embed_scale: bool = False  # Gemma multiplies embeddings by sqrt(d_model)
    mlp_activation: str = "silu"  # gated-MLP activation: "silu" (Llama), "gelu_tanh" (Gemma)
    norm_offset: bool = False  # Gemma's RMSNorm scales by (1 + w), w initialised at 0

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose from {sorted(DTYPES)}")
        if self.mlp_activation not in ACTIVATIONS:
            raise ValueError(
                f"mlp_activation={self.mlp_activation!r}; choose from {sorted(ACTIVATIONS)}"
            )

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return DTYPES[self.param_dtype]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@gin.configurable
def model_config(**overrides: Any) -> TransformerConfig:
    """The model shape, configured in `gin/models/*.gin` as `model_config.NAME = VALUE`."""
    return TransformerConfig(**overrides)


def count_params(params: PyTree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


def _dense_init(fan_in_axes: int = 1):
    return nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=tuple(range(fan_in_axes)), out_axis=-1
    )


@jax.custom_vjp
def linear(x: Array, w: Array) -> Array:
    """x [..., K] @ w [K, N], differentiated by hand: dx = dy·wᵀ, dw = xᵀ·dy with x as the
    left operand. The derivative JAX would derive is the same maths, but on XLA:CPU it leaves
    transposes of the wide [tokens, N] gradient fused into elementwise producers, which were
    the slowest ops of a training step (benchmarks/BENCHMARKS.md, profiling findings)."""
    return x @ w


def _linear_fwd(x: Array, w: Array):
    return x @ w, (x, w)


def _linear_bwd(residuals, dy: Array):
    x, w = residuals
    dw = jnp.einsum("...k,...n->kn", x, dy)
    return (dy @ w.T).astype(x.dtype), dw.astype(w.dtype)


linear.defvjp(_linear_fwd, _linear_bwd)


def dropout(x: Array, rate: float | Array, rng: Array | None) -> Array:
    """Inverted dropout whose rate may be a traced value (members of a vmapped ensemble can
    each use their own rate), unlike `nn.Dropout` whose rate must be static."""
    if rng is None or (isinstance(rate, (int, float)) and rate == 0.0):
        return x
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    mask = jax.random.uniform(rng, x.shape) < keep
    return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))


class RMSNorm(nn.Module):
    eps: float
    param_dtype: Any
    offset: bool = False  # Gemma: the stored scale w multiplies as (1 + w)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(init, ("norm",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale32 = scale.astype(jnp.float32)
        if self.offset:
            scale32 = 1.0 + scale32
        return (y * scale32).astype(x.dtype)


def rope(x: Array, positions: Array, base: float, heads_first: bool = False) -> Array:
    """Rotary embedding, rotate-half convention (as in Llama/Gemma's Hugging Face ports):
    x' = x·cos(pθ) + rotate_half(x)·sin(pθ), θ_i = base^(-2i/d). x is [B, T, N, H], or
    [B, N, T, H] with `heads_first`."""
    d = x.shape[-1]
    inv_freq = base ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, d/2]
    angles = jnp.concatenate([angles, angles], -1)
    angles = angles[:, None, :, :] if heads_first else angles[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : d // 2], x32[..., d // 2 :]
    rotated = jnp.concatenate([-x2, x1], -1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def attention_mask(q_segments: Array, q_slots: Array, k_segments: Array, k_slots: Array) -> Array:
    """[B, 1, 1, T, S] boolean: same non-padding segment and key slot not after query slot."""
    same = (q_segments[:, :, None] == k_segments[:, None, :]) & (q_segments[:, :, None] != 0)
    causal = k_slots[:, None, :] <= q_slots[:, :, None]
    return (same & causal)[:, None, None, :, :]


# Query-block size of the cache-free attention. Queries in slots [i·Q, (i+1)·Q) can only see
# keys in slots < (i+1)·Q, so scoring block by block skips the causal upper triangle: the T×T
# score tensors (and their gradients), which dominate a CPU training step at small head_dim,
# shrink to about (n+1)/2n of their size with n blocks. 0 scores all T×T at once.
QUERY_BLOCK = 64
# Up to this many token rows (decoding steps), tied-embedding logits keep the table as the left
# operand (see `Transformer.logits`); beyond, the [rows, V] result is the bigger transpose.
FEW_ROWS = 64


def _softmax_attend(
    q: Array, k: Array, v: Array, mask: Array, dt: Any, keys_transposed: bool = False
) -> Array:
    """softmax(q·kᵀ/√h + mask)·v for q [B, kv, G, T, H], k and v [B, kv, S, H] (k [B, kv, H, S]
    if `keys_transposed`), mask broadcastable to [B, kv, G, T, S]; scores and softmax in
    float32."""
    k_spec = "bkhs" if keys_transposed else "bksh"
    scores = jnp.einsum(f"bkgth,{k_spec}->bkgts", q, k).astype(jnp.float32)
    scores = scores * (q.shape[-1] ** -0.5)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    return jnp.einsum("bkgts,bksh->bkgth", probs, v)


def causal_attention(q: Array, k: Array, v: Array, mask: Array, dt: Any, block: int) -> Array:
    """Attention of q [B, kv, G, T, H] over k, v [B, kv, T, H] (the same T slots) under a mask
    [B, 1, 1, T, T] that is causal in slots; by query blocks of `block` (see QUERY_BLOCK)."""
    t = q.shape[3]
    if block <= 0 or block >= t:
        return _softmax_attend(q, k, v, mask, dt)
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        outs.append(
            _softmax_attend(
                q[:, :, :, start:end],
                k[:, :, :end],
                v[:, :, :end],
                mask[:, :, :, start:end, :end],
                dt,
            )
        )
    return jnp.concatenate(outs, axis=3)


class Attention(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, x, positions, mask, kv_cache=None, cache_index=None):
        c = self.config
        dt, pdt = c.compute_dtype, c.params_dtype
        groups = c.n_heads // c.n_kv_heads

        def weight(name, n):
            return self.param(
                name,
                nn.with_logical_partitioning(
                    _dense_init(), ("embed", "heads" if n == c.n_heads else "kv_heads", "head_dim")
                ),
                (c.d_model, n, c.head_dim),
                pdt,
            ).astype(dt)

        wq, wk, wv = weight("q", c.n_heads), weight("k", c.n_kv_heads), weight("v", c.n_kv_heads)
        wo = self.param(
            "o",
            nn.with_logical_partitioning(_dense_init(2), ("heads", "head_dim", "embed")),
            (c.n_heads, c.head_dim, c.d_model),
            pdt,
        ).astype(dt)
        b, t, _ = x.shape
        hd = c.head_dim

        if kv_cache is None:
            # Head-major [B, heads, T, H] for the attention dots; the projections are 2-D
            # `linear`s over the flattened heads.
            def heads(w, n):
                y = linear(x, w.reshape(c.d_model, n * hd)).reshape(b, t, n, hd)
                return y.transpose(0, 2, 1, 3)

            q = rope(heads(wq, c.n_heads), positions, c.rope_base, heads_first=True)
            k = rope(heads(wk, c.n_kv_heads), positions, c.rope_base, heads_first=True)
            v = heads(wv, c.n_kv_heads)
            q = q.reshape(b, c.n_kv_heads, groups, t, hd)
            out = causal_attention(q, k, v, mask, dt, QUERY_BLOCK)
            out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, c.n_heads * hd)
            return linear(out, wo.reshape(c.n_heads * hd, c.d_model)), None

        # Incremental decoding. The cache keeps keys as [B, kv, H, S] and values as
        # [B, kv, S, H], the layouts the two attention dots read: with [B, S, kv, H] rows,
        # XLA:CPU transposed every layer's whole cache on every decoded token (a quarter of a
        # batch-64 decode step of the tiny model).
        q = rope(jnp.einsum("btd,dnh->btnh", x, wq), positions, c.rope_base)
        k = rope(jnp.einsum("btd,dnh->btnh", x, wk), positions, c.rope_base)
        v = jnp.einsum("btd,dnh->btnh", x, wv)
        zero = jnp.zeros((), jnp.int32)
        k_all = jax.lax.dynamic_update_slice(
            kv_cache["k"],
            k.transpose(0, 2, 3, 1).astype(kv_cache["k"].dtype),
            (zero, zero, zero, cache_index),
        )
        v_all = jax.lax.dynamic_update_slice(
            kv_cache["v"],
            v.transpose(0, 2, 1, 3).astype(kv_cache["v"].dtype),
            (zero, zero, cache_index, zero),
        )
        q = q.reshape(b, t, c.n_kv_heads, groups, hd).transpose(0, 2, 3, 1, 4)
        k, v = k_all.astype(dt), v_all.astype(dt)
        out = _softmax_attend(q, k, v, mask, dt, keys_transposed=True)  # [B, kv, G, T, H]
        # Moving the (small) activations to [B, T, heads·H] keeps `wo` in its stored layout; an
        # einsum against wo reshaped to [kv, G, H, D] made XLA:CPU copy the weight to another
        # layout on every call, i.e. on every decoded token.
        out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, c.n_heads * hd)
        return linear(out, wo.reshape(c.n_heads * hd, c.d_model)), {"k": k_all, "v": v_all}


class MLP(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        dt, pdt = c.compute_dtype, c.params_dtype

        def w(name, shape, axes):
            init = nn.with_logical_partitioning(_dense_init(), axes)
            return self.param(name, init, shape, pdt).astype(dt)

        gate = linear(x, w("gate", (c.d_model, c.d_ff), ("embed", "mlp")))
        up = linear(x, w("up", (c.d_model, c.d_ff), ("embed", "mlp")))
        act = ACTIVATIONS[c.mlp_activation]
        return linear(act(gate) * up, w("down", (c.d_ff, c.d_model), ("mlp", "embed")))


class Block(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, x, positions, mask, kv_cache, cache_index, dropout_rate, rng):
        c = self.config
        rngs = (None, None) if rng is None else tuple(jax.random.split(rng))
        h, new_cache = Attention(c, name="attn")(
            RMSNorm(c.norm_eps, c.params_dtype, c.norm_offset, name="attn_norm")(x),
            positions,
            mask,
            kv_cache,
            cache_index,
        )
        x = x + dropout(h, dropout_rate, rngs[0])
        h = MLP(c, name="mlp")(
            RMSNorm(c.norm_eps, c.params_dtype, c.norm_offset, name="mlp_norm")(x)
        )
        x = x + dropout(h, dropout_rate, rngs[1])
        return x, new_cache


def last_token_index(segment_ids: Array) -> Array:
    """Index of each row's last non-padding token ([B] int32; 0 for an all-padding row)."""
    t = segment_ids.shape[1]
    real = segment_ids != 0
    idx = t - 1 - jnp.argmax(real[:, ::-1], axis=1)
    return jnp.where(real.any(axis=1), idx, 0).astype(jnp.int32)


class Transformer(nn.Module):
    """`__call__(tokens, positions, segment_ids, ...)` → logits [B,T,V], rewards [B] or hidden.

    With `cache` (from `init_cache`), the tokens are written at slots
    `cache["index"] : cache["index"] + T` and `(output, new_cache)` is returned.
    """

    config: TransformerConfig

    def setup(self):
        c = self.config
        self.embed = nn.Embed(
            c.vocab_size,
            c.d_model,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("vocab", "embed")
            ),
            param_dtype=c.params_dtype,
            dtype=c.compute_dtype,
        )
        self.blocks = [Block(c, name=f"block_{i}") for i in range(c.n_layers)]
        self.final_norm = RMSNorm(c.norm_eps, c.params_dtype, c.norm_offset)
        if not c.tie_embeddings:
            self.lm_head = self.param(
                "lm_head",
                nn.with_logical_partitioning(_dense_init(), ("embed", "vocab")),
                (c.d_model, c.vocab_size),
                c.params_dtype,
            )
        self.reward_head = nn.Dense(
            1,
            kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "unsharded")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("unsharded",)),
            param_dtype=c.params_dtype,
            dtype=jnp.float32,
        )

    def hidden(self, tokens, positions, segment_ids, cache, dropout_rate, deterministic):
        c = self.config
        b, t = tokens.shape
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = self.embed(tokens)
        if c.embed_scale:
            x = x * jnp.asarray(c.d_model**0.5, x.dtype)
        if cache is None:
            slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            mask = attention_mask(segment_ids, slots, segment_ids, slots)
            index, new_cache = None, None
        else:
            index = cache["index"]
            s = cache["segment_ids"].shape[1]
            k_segments = jax.lax.dynamic_update_slice(
                cache["segment_ids"], segment_ids.astype(jnp.int32), (jnp.int32(0), index)
            )
            q_slots = jnp.broadcast_to(index + jnp.arange(t, dtype=jnp.int32), (b, t))
            k_slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            mask = attention_mask(segment_ids, q_slots, k_segments, k_slots)
            new_cache = {"segment_ids": k_segments, "index": index + t, "layers": []}
        rng = None if deterministic else self.make_rng("dropout")
        for i, block in enumerate(self.blocks):
            layer_rng = None if rng is None else jax.random.fold_in(rng, i)
            layer_cache = None if cache is None else cache["layers"][i]
            x, updated = block(x, positions, mask, layer_cache, index, dropout_rate, layer_rng)
            if cache is not None:
                new_cache["layers"].append(updated)
        return self.final_norm(x), segment_ids, new_cache

    def logits(self, h: Array) -> Array:
        if self.config.tie_embeddings:
            table = self.embed.embedding.astype(h.dtype)  # [V, D]
            if math.prod(h.shape[:-1]) <= FEW_ROWS:
                # A few rows (decoding): the table as the left operand, in its stored layout.
                # h @ tableᵀ makes XLA:CPU transpose the whole table first, on every decoded
                # token (113 MB for SmolLM2-135M: a quarter of a token's time at batch 1).
                out = jax.lax.dot_general(table, h, (((1,), (h.ndim - 1,)), ((), ())))
                return jnp.moveaxis(out, 0, -1).astype(jnp.float32)
            w = table.T
        else:
            w = self.lm_head.astype(h.dtype)
        return linear(h, w).astype(jnp.float32)

    def __call__(
        self,
        tokens: Array,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        *,
        cache: PyTree | None = None,
        output: str = "logits",
        dropout_rate: float | Array = 0.0,
        deterministic: bool = True,
    ):
        h, segment_ids, new_cache = self.hidden(
            tokens, positions, segment_ids, cache, dropout_rate, deterministic
        )
        # Both heads are always touched so that `init` creates every parameter.
        if output == "logits" or self.is_initializing():
            out = self.logits(h)
        if output == "reward" or self.is_initializing():
            idx = last_token_index(segment_ids)
            last = jnp.take_along_axis(h, idx[:, None, None], axis=1)[:, 0]
            out = self.reward_head(last)[:, 0]
        if output == "hidden":
            out = h
        elif output not in ("logits", "reward"):
            raise ValueError(f"output={output!r}; choose 'logits', 'reward' or 'hidden'")
        return out if cache is None else (out, new_cache)


def init_cache(config: TransformerConfig, batch: int, max_len: int, dtype=None) -> PyTree:
    """An empty KV cache: per layer, keys [B, n_kv_heads, head_dim, S] and values
    [B, n_kv_heads, S, head_dim] (see `Attention`); the segment id of every slot."""
    dtype = dtype or config.compute_dtype
    kv, hd = config.n_kv_heads, config.head_dim
    return {
        "index": jnp.zeros((), jnp.int32),
        "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
        "layers": [
            {
                "k": jnp.zeros((batch, kv, hd, max_len), dtype),
                "v": jnp.zeros((batch, kv, max_len, hd), dtype),
            }
            for _ in range(config.n_layers)
        ],
    }


def _dummy_tokens() -> Array:
    return jnp.zeros((1, 2), jnp.int32)


def init_params(config: TransformerConfig, rng: Array) -> PyTree:
    """Fresh parameters as a plain pytree (logical-axis boxes removed)."""
    boxed = Transformer(config).init(rng, _dummy_tokens())
    return nn.meta.unbox(boxed)


def param_logical_axes(config: TransformerConfig) -> PyTree:
    """Tree of `PartitionSpec`s of logical axis names, matching `init_params`'s tree."""
    boxed = jax.eval_shape(lambda: Transformer(config).init(jax.random.PRNGKey(0), _dummy_tokens()))
    return nn.get_partition_spec(boxed)


def apply(params: PyTree, config: TransformerConfig, tokens: Array, **kwargs) -> Any:
    """The pure forward pass: `apply(params, config, tokens, positions=..., segment_ids=...,
    cache=..., output='logits'|'reward'|'hidden', dropout_rate=..., rng=...)`."""
    rng = kwargs.pop("rng", None)
    kwargs.setdefault("deterministic", rng is None)
    rngs = None if rng is None else {"dropout": rng}
    return Transformer(config).apply(params, tokens, rngs=rngs, **kwargs)
