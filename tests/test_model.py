"""The transformer: KV-cache decoding, GQA, padding/segments, heads, dtypes and sizes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from warm_jax.models import transformer as tm

CFG = tm.TransformerConfig(
    vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48
)


@pytest.fixture(scope="module")
def params():
    return tm.init_params(CFG, jax.random.PRNGKey(0))


def _tokens(b, t, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 1, CFG.vocab_size)


def test_kv_cache_decoding_equals_full_forward(params):
    toks = _tokens(3, 12)
    full = tm.apply(params, CFG, toks)
    cache = tm.init_cache(CFG, 3, 16)
    out, cache = tm.apply(params, CFG, toks[:, :5], cache=cache)
    steps = [out]
    for i in range(5, 12):
        pos = jnp.full((3, 1), i, jnp.int32)
        out, cache = tm.apply(params, CFG, toks[:, i : i + 1], positions=pos, cache=cache)
        steps.append(out)
    chex.assert_trees_all_close(jnp.concatenate(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert int(cache["index"]) == 12


def test_tied_logits_of_few_and_many_rows_agree(params):
    """Up to FEW_ROWS token rows the tied head multiplies with the table as the left operand
    (decoding); more rows use h @ tableᵀ. Both are the same logits, and the cache path's
    logits match a full pass that takes the other branch."""
    assert CFG.tie_embeddings
    n = tm.FEW_ROWS + 6
    h = jax.random.normal(jax.random.PRNGKey(3), (2, n, CFG.d_model))
    model = tm.Transformer(CFG)
    many = model.apply(params, h, method=tm.Transformer.logits)
    few = model.apply(params, h[:, :1], method=tm.Transformer.logits)
    table = params["params"]["embed"]["embedding"]
    np.testing.assert_allclose(many, np.einsum("btd,vd->btv", h, table), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(few, many[:, :1], atol=1e-5, rtol=1e-5)
    toks = _tokens(2, n // 2 + 1)  # over FEW_ROWS rows: the full pass takes the other branch
    full = tm.apply(params, CFG, toks)
    cache = tm.init_cache(CFG, 2, toks.shape[1])
    _, cache = tm.apply(params, CFG, toks[:, :-1], cache=cache)
    pos = jnp.full((2, 1), toks.shape[1] - 1, jnp.int32)
    last, _ = tm.apply(params, CFG, toks[:, -1:], positions=pos, cache=cache)
    chex.assert_trees_all_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)


def test_left_padded_prompts_decode_like_unpadded(params):
    # Row 0 is left-padded by 3; its positions start at 0 at the first real token.
    toks = _tokens(1, 6)
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), toks], 1)
    seg = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    pos = jnp.array([[0, 0, 0, 0, 1, 2, 3, 4, 5]])
    ref = tm.apply(params, CFG, toks)
    cache = tm.init_cache(CFG, 1, 12)
    out, cache = tm.apply(
        params, CFG, padded[:, :6], positions=pos[:, :6], segment_ids=seg[:, :6], cache=cache
    )
    outs = [out[:, 3:]]
    for i in range(6, 9):
        o, cache = tm.apply(
            params,
            CFG,
            padded[:, i : i + 1],
            positions=pos[:, i : i + 1],
            segment_ids=seg[:, i : i + 1],
            cache=cache,
        )
        outs.append(o)
    chex.assert_trees_all_close(jnp.concatenate(outs, 1), ref, atol=1e-5, rtol=1e-5)


def test_packed_segments_equal_separate_sequences(params):
    a, b = _tokens(1, 5, seed=2), _tokens(1, 7, seed=3)
    packed = jnp.concatenate([a, b], 1)
    seg = jnp.array([[1] * 5 + [2] * 7])
    pos = jnp.array([list(range(5)) + list(range(7))])
    out = tm.apply(params, CFG, packed, positions=pos, segment_ids=seg)
    chex.assert_trees_all_close(out[:, :5], tm.apply(params, CFG, a), atol=1e-5)
    chex.assert_trees_all_close(out[:, 5:], tm.apply(params, CFG, b), atol=1e-5)


def test_right_padding_does_not_change_real_tokens_or_reward(params):
    toks = _tokens(2, 6)
    params = jax.tree.map(lambda x: x, params)
    # A non-zero reward head so the test is not trivially 0 == 0.
    head = params["params"]["reward_head"]
    head["kernel"] = jax.random.normal(jax.random.PRNGKey(5), head["kernel"].shape)
    head["bias"] = jnp.array([0.3])
    padded = jnp.concatenate([toks, _tokens(2, 4, seed=9)], 1)  # garbage after the end
    seg = jnp.concatenate([jnp.ones((2, 6), jnp.int32), jnp.zeros((2, 4), jnp.int32)], 1)
    chex.assert_trees_all_close(
        tm.apply(params, CFG, padded, segment_ids=seg)[:, :6],
        tm.apply(params, CFG, toks),
        atol=1e-5,
    )
    r_pad = tm.apply(params, CFG, padded, segment_ids=seg, output="reward")
    r = tm.apply(params, CFG, toks, output="reward")
    chex.assert_trees_all_close(r_pad, r, atol=1e-5)
    # The reward is the head applied to the final hidden state of the last real token.
    h = tm.apply(params, CFG, toks, output="hidden")
    expected = h[:, -1] @ head["kernel"][:, 0] + 0.3
    chex.assert_trees_all_close(r, expected, atol=1e-5)
    assert float(jnp.abs(r).max()) > 1e-3


@pytest.mark.parametrize("block", [4, 5])
def test_query_blocked_attention_equals_full_scores(params, monkeypatch, block):
    # Rows: one sequence; two packed segments; right padding; left padding. T = 13 is not a
    # multiple of either block size, so the last block is short.
    t = 13
    toks = _tokens(4, t, seed=7)
    seg = jnp.array([[1] * 13, [1] * 6 + [2] * 7, [1] * 9 + [0] * 4, [0] * 3 + [1] * 10], jnp.int32)
    pos = jnp.array(
        [
            list(range(13)),
            list(range(6)) + list(range(7)),
            list(range(13)),
            [0] * 3 + list(range(10)),
        ],
        jnp.int32,
    )
    p = jax.tree.map(lambda x: x, params)
    head = p["params"]["reward_head"]
    head["kernel"] = jax.random.normal(jax.random.PRNGKey(5), head["kernel"].shape)

    def run(q_block):
        monkeypatch.setattr(tm, "QUERY_BLOCK", q_block)

        def reward_sum(w):
            return tm.apply(w, CFG, toks, positions=pos, segment_ids=seg, output="reward").sum()

        logits = tm.apply(p, CFG, toks, positions=pos, segment_ids=seg)
        return logits, jax.value_and_grad(reward_sum)(p)

    full_logits, (full_r, full_g) = run(0)
    logits, (r, g) = run(block)
    real = np.asarray(seg != 0)
    chex.assert_trees_all_close(np.asarray(logits)[real], np.asarray(full_logits)[real], atol=1e-5)
    chex.assert_trees_all_close(r, full_r, atol=1e-5)
    # Gradients sum over tokens in another order: equal up to float32 rounding of the leaf.
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(full_g)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * float(jnp.abs(b).max()) + 1e-9)
    assert float(jnp.abs(full_r)) > 1e-3


@pytest.mark.parametrize("lead", [(7,), (2, 3)])
def test_linear_has_the_gradients_of_a_matmul(lead):
    kx, kw, kc = jax.random.split(jax.random.PRNGKey(3), 3)
    x = jax.random.normal(kx, (*lead, 5))
    w = jax.random.normal(kw, (5, 4))
    cot = jax.random.normal(kc, (*lead, 4))

    def loss(f):
        return lambda x, w: jnp.sum(jnp.sin(f(x, w)) * cot)

    ours = jax.grad(loss(tm.linear), argnums=(0, 1))(x, w)
    ref = jax.grad(loss(jnp.matmul), argnums=(0, 1))(x, w)
    chex.assert_trees_all_close(tm.linear(x, w), x @ w, atol=1e-6)
    chex.assert_trees_all_close(ours, ref, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(
        jax.vmap(jax.grad(loss(tm.linear), argnums=1), in_axes=(0, None))(x, w),
        jax.vmap(jax.grad(loss(jnp.matmul), argnums=1), in_axes=(0, None))(x, w),
        atol=1e-5,
        rtol=1e-5,
    )


def test_gqa_equals_multi_head_attention_with_repeated_kv(params):
    mha = tm.TransformerConfig(**{**CFG.to_dict(), "n_kv_heads": CFG.n_heads})
    groups = CFG.n_heads // CFG.n_kv_heads
    p = jax.tree.map(lambda x: x, params)
    for i in range(CFG.n_layers):
        attn = p["params"][f"block_{i}"]["attn"]
        attn["k"] = jnp.repeat(attn["k"], groups, axis=1)
        attn["v"] = jnp.repeat(attn["v"], groups, axis=1)
    toks = _tokens(2, 9)
    chex.assert_trees_all_close(
        tm.apply(p, mha, toks), tm.apply(params, CFG, toks), atol=1e-5, rtol=1e-5
    )


def test_bfloat16_compute_is_close_to_float32(params):
    bf = tm.TransformerConfig(**{**CFG.to_dict(), "dtype": "bfloat16"})
    toks = _tokens(2, 8)
    lo, hi = tm.apply(params, bf, toks), tm.apply(params, CFG, toks)
    assert lo.dtype == jnp.float32  # logits are returned in float32 either way
    np.testing.assert_allclose(lo, hi, atol=0.05)
    p16 = tm.init_params(
        tm.TransformerConfig(**{**CFG.to_dict(), "param_dtype": "bfloat16"}), jax.random.PRNGKey(0)
    )
    assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype(jnp.bfloat16)}


def test_dropout_rate_can_be_traced_and_zero_rate_is_identity(params):
    toks = _tokens(2, 8)
    rng = jax.random.PRNGKey(3)
    f = jax.jit(lambda r: tm.apply(params, CFG, toks, dropout_rate=r, rng=rng))
    chex.assert_trees_all_close(f(0.0), tm.apply(params, CFG, toks), atol=1e-6)
    assert float(jnp.abs(f(0.5) - f(0.0)).max()) > 1e-3


def test_untied_embeddings_have_an_output_head():
    cfg = tm.TransformerConfig(**{**CFG.to_dict(), "tie_embeddings": False})
    p = tm.init_params(cfg, jax.random.PRNGKey(0))
    assert p["params"]["lm_head"].shape == (CFG.d_model, CFG.vocab_size)
    h = tm.apply(p, cfg, _tokens(1, 4), output="hidden")
    chex.assert_trees_all_close(
        tm.apply(p, cfg, _tokens(1, 4)), h @ p["params"]["lm_head"], atol=1e-5
    )


def test_smollm2_shape_has_its_published_parameter_count():
    cfg = tm.TransformerConfig(
        vocab_size=49152,
        d_model=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        head_dim=64,
        d_ff=1536,
        rope_base=100000.0,
        tie_embeddings=True,
    )
    shapes = jax.eval_shape(lambda k: tm.init_params(cfg, k), jax.random.PRNGKey(0))
    n = tm.count_params(shapes)
    # 134,515,008 for the Llama backbone (SmolLM2-135M) + 577 for the scalar reward head.
    assert n == 134_515_008 + 577


def test_invalid_config_is_rejected():
    with pytest.raises(ValueError, match="n_kv_heads"):
        tm.TransformerConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="dtype"):
        tm.TransformerConfig(dtype="float64")
