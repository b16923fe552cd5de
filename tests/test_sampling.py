"""Sampling: KV-cache generation against full forward passes, log-probabilities against teacher
forcing, top-k/top-p, EOS handling, seeds, compilation and sharding."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from warm_jax import sharding
from warm_jax.models import transformer as tm
from warm_jax.policy import sampling as sp

CFG = tm.TransformerConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48
)
# 8 rows of uneven lengths, so the batch splits over the 8 emulated devices.
PROMPTS = [
    [1, 5, 9],
    [1, 7, 3, 22, 40, 11, 8],
    [1],
    [1, 30, 2, 17, 5],
    [1, 12],
    [1, 4, 4, 4],
    [1, 50, 51],
    [1, 60, 6, 6, 6, 6],
]
N = 10
# Jitted once for the whole file: eager teacher forcing would dispatch op by op.
teacher_forced = jax.jit(sp.sequence_logprobs, static_argnums=1)


@pytest.fixture(scope="module")
def params():
    p = tm.init_params(CFG, jax.random.PRNGKey(0))
    # A fresh model's logits are nearly flat; larger (tied) embeddings make it peaky, so greedy
    # ties, EOS and the top-p nucleus are not all decided by rounding.
    p["params"]["embed"]["embedding"] = p["params"]["embed"]["embedding"] * 8.0
    return p


@pytest.fixture(scope="module")
def batch():
    return sp.left_pad(PROMPTS, bucket=8)


def test_left_pad_right_aligns_prompts_in_a_bucket():
    b = sp.left_pad([[7, 8, 9], [5]], bucket=4, pad_id=0)
    np.testing.assert_array_equal(b["tokens"], [[0, 7, 8, 9], [0, 0, 0, 5]])
    np.testing.assert_array_equal(b["segment_ids"], [[0, 1, 1, 1], [0, 0, 0, 1]])
    np.testing.assert_array_equal(b["positions"], [[0, 0, 1, 2], [0, 0, 0, 0]])
    assert sp.left_pad([[1] * 17], bucket=16)["tokens"].shape == (1, 32)
    assert sp.left_pad([[1] * 17], bucket=None)["tokens"].shape == (1, 32)
    assert sp.left_pad([[1] * 5], bucket=None)["tokens"].shape == (1, 8)
    assert sp.left_pad([[1] * 5], length=6)["tokens"].shape == (1, 6)
    with pytest.raises(ValueError, match="does not fit"):
        sp.left_pad([[1] * 5], length=4)
    with pytest.raises(ValueError, match="at least one token"):
        sp.left_pad([[1], []])


def test_invalid_sampling_configs_and_right_padded_prompts_are_rejected(params):
    for bad in ({"max_new_tokens": 0}, {"temperature": -1}, {"top_k": -2}, {"top_p": 0.0}):
        with pytest.raises(ValueError):
            sp.SamplingConfig(**{"max_new_tokens": 4, **bad})
    right = {k: v[:, ::-1] for k, v in sp.left_pad([[1, 2], [1]], bucket=4).items()}
    with pytest.raises(ValueError, match="left-padded"):
        sp.sample(params, CFG, right, 0, sp.SamplingConfig(max_new_tokens=2))


def test_top_p_keeps_the_smallest_set_with_mass_p():
    # Probabilities in shuffled order, so the nucleus must be mapped back through the sort.
    probs = np.array([0.05, 0.5, 0.1, 0.2, 0.15], np.float32)
    logits = jnp.log(probs)[None]
    expected = {
        0.45: [1],
        0.6: [1, 3],
        0.75: [1, 3, 4],
        0.9: [1, 2, 3, 4],
        0.99: [0, 1, 2, 3, 4],
    }
    for p, keep in expected.items():
        kept = np.flatnonzero(np.isfinite(sp.filter_logits(logits, top_p=p)[0]))
        np.testing.assert_array_equal(kept, keep, err_msg=f"top_p={p}")
        # The nucleus is minimal: dropping its least likely member leaves mass < p.
        assert probs[keep].sum() >= p > probs[keep].sum() - probs[keep].min()
    np.testing.assert_array_equal(
        np.flatnonzero(np.isfinite(sp.filter_logits(logits, top_k=2)[0])), [1, 3]
    )
    # top-k first, then the nucleus of the renormalised top 3 (0.5, 0.2, 0.15 -> 0.59, 0.24, ..).
    np.testing.assert_array_equal(
        np.flatnonzero(np.isfinite(sp.filter_logits(logits, top_k=3, top_p=0.8)[0])), [1, 3]
    )


def test_sampled_frequencies_follow_the_renormalised_nucleus():
    probs = jnp.array([0.05, 0.5, 0.1, 0.2, 0.15])
    logits = jnp.broadcast_to(jnp.log(probs), (4000, 5))
    cfg = sp.SamplingConfig(max_new_tokens=1, top_p=0.75)
    tokens, logp = jax.jit(lambda k: sp.choose_tokens(logits, k, cfg))(jax.random.PRNGKey(0))
    freq = np.bincount(np.asarray(tokens), minlength=5) / tokens.shape[0]
    np.testing.assert_allclose(freq, [0, 0.5 / 0.85, 0, 0.2 / 0.85, 0.15 / 0.85], atol=0.03)
    # Log-probabilities are those of the untruncated (tempered) distribution.
    np.testing.assert_allclose(logp, np.log(probs)[np.asarray(tokens)], rtol=1e-5)


def test_first_argmax_and_token_draws_equal_jax_argmax_and_categorical():
    logits = 3.0 * jax.random.normal(jax.random.PRNGKey(1), (16, 300))
    ties = jnp.round(logits)  # many equal maxima: the first one wins
    nans = logits.at[2, 7].set(jnp.nan).at[2, 9].set(jnp.nan).at[5, 0].set(jnp.nan)
    for x in (logits, ties, nans, -jnp.inf * jnp.ones((2, 5))):
        np.testing.assert_array_equal(sp.first_argmax(x), jnp.argmax(x, axis=-1))
    cfg = sp.SamplingConfig(max_new_tokens=1, temperature=0.7)
    draw = jax.jit(lambda k: sp.choose_tokens(logits, k, cfg)[0])
    for seed in range(10):
        key = jax.random.PRNGKey(seed)
        np.testing.assert_array_equal(draw(key), jax.random.categorical(key, logits / 0.7, axis=-1))


@pytest.fixture(scope="module")
def greedy_ref(params):
    return _greedy_by_full_forward(params, PROMPTS, N)


def _greedy_by_full_forward(params, prompts, n):
    """Reference: argmax of a fresh full forward pass per token, right-padded, no cache."""
    t = max(map(len, prompts)) + n
    forward = jax.jit(lambda toks, seg: tm.apply(params, CFG, toks, segment_ids=seg))
    seqs = [list(p) for p in prompts]
    for _ in range(n):
        toks = np.array([s + [0] * (t - len(s)) for s in seqs], np.int32)
        seg = np.array([[1] * len(s) + [0] * (t - len(s)) for s in seqs], np.int32)
        logits = np.asarray(forward(toks, seg))
        for i, s in enumerate(seqs):
            s.append(int(np.argmax(logits[i, len(s) - 1])))
    return np.array([s[len(p) :] for s, p in zip(seqs, prompts)])


def test_greedy_through_the_cache_equals_argmax_of_full_forward_passes(params, batch, greedy_ref):
    out = sp.sample(params, CFG, batch, 0, sp.SamplingConfig(max_new_tokens=N, temperature=0))
    ref = greedy_ref
    np.testing.assert_array_equal(out.tokens, ref)
    np.testing.assert_array_equal(out.lengths, [N] * len(PROMPTS))
    assert not np.asarray(out.finished).any()
    # Greedy reports untempered log-probabilities, which teacher forcing at T=1 reproduces.
    seq = out.sequences()
    tf = teacher_forced(params, CFG, **seq, temperature=1.0)
    np.testing.assert_allclose(tf[:, batch["tokens"].shape[1] :], out.logprobs, atol=2e-5)
    assert float(jnp.abs(tf[:, : batch["tokens"].shape[1]]).max()) == 0.0
    # top_k=1 at any temperature is greedy too.
    top1 = sp.sample(
        params, CFG, batch, 3, sp.SamplingConfig(max_new_tokens=N, temperature=0.7, top_k=1)
    )
    np.testing.assert_array_equal(top1.tokens, ref)


@pytest.fixture(scope="module")
def tempered(params, batch):
    cfg = sp.SamplingConfig(max_new_tokens=N, temperature=0.8, top_k=20, top_p=0.9, eos_id=41)
    return cfg, sp.sample(params, CFG, batch, jax.random.PRNGKey(7), cfg)


def test_logprobs_equal_teacher_forcing_at_the_sampling_temperature(
    params, batch, tempered, greedy_ref
):
    cfg, out = tempered
    p = batch["tokens"].shape[1]
    seq = out.sequences()
    tf = teacher_forced(params, CFG, **seq, temperature=cfg.temperature)
    np.testing.assert_allclose(tf[:, p:], out.logprobs, atol=2e-5)
    np.testing.assert_array_equal(seq["loss_mask"][:, p:], out.response_mask())
    assert float(jnp.abs(tf[:, :p]).max()) == 0.0
    # The untempered log-probabilities are a different, also available, quantity.
    untempered = teacher_forced(params, CFG, **seq, temperature=1.0)[:, p:]
    assert float(jnp.abs(untempered - out.logprobs).max()) > 0.05
    # Sampled tokens lie in each step's top-20 (so log π_T is not tiny) and are not all greedy.
    assert float(out.logprobs.min()) > -12.0
    assert (np.asarray(out.tokens[:, 0]) != greedy_ref[:, 0]).any()


def test_eos_ends_a_row_with_padding_and_zero_logprobs(tempered):
    cfg, out = tempered
    tokens, logp = np.asarray(out.tokens), np.asarray(out.logprobs)
    lengths, finished = np.asarray(out.lengths), np.asarray(out.finished)
    assert finished.any() and not finished.all(), "seed should give finished and cut rows"
    for row, lp, n, fin in zip(tokens, logp, lengths, finished):
        assert (row[:n] == cfg.eos_id).sum() == int(fin)
        assert not fin or row[n - 1] == cfg.eos_id
        assert n == N or fin
        np.testing.assert_array_equal(row[n:], cfg.pad_id)
        np.testing.assert_array_equal(lp[n:], 0.0)
        assert (lp[:n] <= 0).all()
    assert out.to_lists()[0] == tokens[0, : lengths[0]].tolist()


def test_greedy_stops_at_eos_where_the_uncut_run_emits_it(params, batch, greedy_ref):
    ref = greedy_ref
    eos = int(ref[1, 3])  # row 1 emits it at step 3 (or before)
    out = sp.sample(
        params, CFG, batch, 0, sp.SamplingConfig(max_new_tokens=N, temperature=0, eos_id=eos)
    )
    for row, got, n in zip(ref, np.asarray(out.tokens), np.asarray(out.lengths)):
        hits = np.flatnonzero(row == eos)
        expect = hits[0] + 1 if hits.size else N
        assert n == expect
        np.testing.assert_array_equal(got[:n], row[:n])
        np.testing.assert_array_equal(got[n:], 0)
    assert int(out.lengths[1]) <= 4


def test_sampling_is_reproducible_from_a_seed(params, batch, tempered):
    cfg, out = tempered
    again = sp.sample(params, CFG, batch, jax.random.PRNGKey(7), cfg)
    chex.assert_trees_all_equal(again, out)
    other = sp.sample(params, CFG, batch, jax.random.PRNGKey(8), cfg)
    assert (np.asarray(other.tokens) != np.asarray(out.tokens)).any()


def test_compiled_once_per_shape_with_weights_as_arguments(params, batch, tempered):
    cfg, _ = tempered
    sizes = (sp._prefill._cache_size(), sp._decode._cache_size())
    new_params = jax.tree.map(lambda x: x * 1.01, params)
    other_prompts = sp.left_pad([[1, 2, 3, 4, 5, 6, 7, 8]] * len(PROMPTS), bucket=8)
    with warnings.catch_warnings():
        # Donation must work: XLA warns when a donated buffer cannot be reused.
        warnings.simplefilter("error")
        out = sp.sample(new_params, CFG, other_prompts, 1, cfg)
    assert (sp._prefill._cache_size(), sp._decode._cache_size()) == sizes
    # Every leaf of the decode state (the KV cache above all) is donated and updated in place.
    prompt = {k: jnp.asarray(v) for k, v in batch.items()}
    state = sp._prefill(params, CFG, prompt, jax.random.PRNGKey(0), cfg)
    hlo = sp._decode.lower(params, CFG, state, cfg).as_text()
    assert hlo.count("tf.aliasing_output") == len(jax.tree.leaves(state))
    assert out.tokens.shape == (len(PROMPTS), N)


def test_sequence_logprobs_has_gradients_only_through_the_response(params, tempered):
    _, out = tempered
    seq = out.sequences()

    def total(p, mask):
        return sp.sequence_logprobs(p, CFG, **{**seq, "loss_mask": mask}, temperature=0.8).sum()

    grad = jax.jit(jax.grad(total))
    grads = grad(params, seq["loss_mask"])
    norm = float(jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads))))
    assert np.isfinite(norm) and norm > 1e-3
    none = grad(params, jnp.zeros_like(seq["loss_mask"]))
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(none)) == 0.0
    with pytest.raises(ValueError, match="temperature"):
        sp.sequence_logprobs(params, CFG, **seq, temperature=0.0)


def test_sharded_sampling_gives_the_same_samples(params, batch, tempered):
    cfg, out = tempered
    mesh = sharding.make_mesh((("data", 2), ("fsdp", 2), ("model", 2)))
    rules = sharding.logical_rules()
    shardings = sharding.tree_shardings(tm.param_logical_axes(CFG), params, mesh, rules)
    sharded_params = jax.device_put(params, shardings)
    spec = sharded_params["params"]["block_0"]["attn"]["q"].sharding.spec
    assert tuple(spec) == ("fsdp", "model", None)
    sharded_batch = jax.device_put(batch, sharding.batch_shardings(batch, mesh, rules))
    got = sp.sample(sharded_params, CFG, sharded_batch, jax.random.PRNGKey(7), cfg)
    assert len(got.tokens.sharding.device_set) == 8
    np.testing.assert_array_equal(got.tokens, out.tokens)
    np.testing.assert_array_equal(got.lengths, out.lengths)
    np.testing.assert_allclose(got.logprobs, out.logprobs, atol=2e-5)


class _CharTokenizer:
    """Token i <-> the i-th lowercase letter shifted by 3 (ids 0-2: pad, bos, eos)."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def encode(self, text):
        return [3 + (ord(c) - ord("a")) % 26 for c in text.replace(" ", "")]

    def decode(self, ids):
        return " ".join(chr(ord("a") + (i - 3) % 26) if i >= 3 else "?" for i in ids)


def test_sample_texts_chunks_share_one_program_and_match_sample(params):
    tok = _CharTokenizer()
    prompts = ["abc", "hello", "x", "wxyz", "pq", "mnop"]
    cfg = sp.SamplingConfig(max_new_tokens=6, temperature=1.0, eos_id=tok.eos_id)
    out = sp.sample_texts(params, CFG, tok, prompts, cfg, seed=3, chunk=4)
    assert len(out.responses) == len(prompts) == len(out.lengths) == len(out.finished)
    # Chunk 0 is exactly `sample` on those prompts with key fold_in(PRNGKey(3), 0), padded to
    # the length of the longest prompt overall.
    length = sp.bucket_length(1 + max(len(tok.encode(p)) for p in prompts))
    batch = sp.left_pad(
        [[tok.bos_id, *tok.encode(p)] for p in prompts[:4]], length=length, pad_id=tok.pad_id
    )
    ref = sp.sample(params, CFG, batch, jax.random.fold_in(jax.random.PRNGKey(3), 0), cfg)
    for row, n, text in zip(np.asarray(ref.tokens), np.asarray(ref.lengths), out.responses):
        assert text == tok.decode([t for t in row[:n] if t != tok.eos_id]).strip()
    np.testing.assert_array_equal(out.lengths[:4], np.asarray(ref.lengths))
    # The short last chunk is padded to the full chunk, so its rows do not depend on the padding.
    again = sp.sample_texts(params, CFG, tok, prompts, cfg, seed=3, chunk=4)
    assert again.responses == out.responses
