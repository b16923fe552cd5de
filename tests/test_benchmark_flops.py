"""The model-FLOP formulas behind the benchmarks' FLOP/s and peak fractions (benchmarks/common.py)
against XLA's own count of the compiled programs."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks import common as C
from warm_jax.models import transformer as tm
from warm_jax.policy import reinforce

B, P, N = 2, 4, 4


def xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def sequences(t: int, first: int) -> dict:
    return {
        "tokens": jnp.ones((B, t), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(t), (B, t)),
        "segment_ids": jnp.ones((B, t), jnp.int32),
        "loss_mask": jnp.arange(t)[None, :].repeat(B, 0) >= first,
    }


@pytest.mark.parametrize("shape", ["tiny", "small"])
def test_forward_and_gradient_flops_match_xla_count(shape, monkeypatch):
    # Query blocks of one slot score exactly the causally visible keys, which is what the
    # formula counts; XLA adds the elementwise work (norms, rope, softmax): a few percent.
    monkeypatch.setattr(tm, "QUERY_BLOCK", 1)
    cfg = C.shape_config(shape, n_layers=2)  # the count is linear in layers; compiles faster
    params = jax.eval_shape(lambda: tm.init_params(cfg, jax.random.PRNGKey(0)))  # shapes only
    t = P + N
    seq = sequences(t, P)

    def logprob_sum(p):
        return reinforce.token_logprobs(p, cfg, seq, 1.0, first=P)[0].sum()

    model = B * C.forward_flops(cfg, t, C.causal_keys(t), N)
    forward = xla_flops(logprob_sum, params)
    backward = xla_flops(jax.grad(logprob_sum), params)
    assert 1.0 <= forward / model < 1.05, (forward, model)
    assert 1.0 <= backward / (3 * model) < 1.05, (backward, model)

    def rewards(p):
        return tm.apply(p, cfg, seq["tokens"], positions=seq["positions"], output="hidden")

    hidden = xla_flops(rewards, params)
    assert 1.0 <= hidden / (B * C.forward_flops(cfg, t, C.causal_keys(t), 0)) < 1.05


def test_generation_flops_are_one_causal_pass_over_the_tokens_fed():
    # A KV cache computes each fed token once: prompt + the first N - 1 new tokens, with the
    # vocabulary projected for the prompt's last slot and every fed new token.
    cfg = C.shape_config("small")
    fed = P + N - 1
    assert C.generate_flops(cfg, B, P, N) == B * C.forward_flops(cfg, fed, C.causal_keys(fed), N)
    assert C.causal_keys(3) == 1 + 2 + 3
    assert C.causal_keys(2, offset=5) == 6 + 7


def test_reinforce_flops_add_sampling_policy_gradient_frozen_passes_and_reward():
    cfg = C.shape_config("tiny")
    t = P + N
    policy = C.forward_flops(cfg, t, C.causal_keys(t), N)
    reward = C.forward_flops(cfg, t, C.causal_keys(t), 0)
    rows = 6
    for frozen in (1, 2):
        assert C.reinforce_flops(cfg, rows, P, N, frozen) == pytest.approx(
            C.generate_flops(cfg, rows, P, N) + rows * ((3 + frozen) * policy + reward)
        )


def test_flops_summary_rates_and_peak_fractions():
    s = C.flops_summary("f", 2e9, {"ours": 3.0, "peer": 1.5}, 12.0)
    assert s["ours_gflops"] == pytest.approx(6.0) and s["peer_gflops"] == pytest.approx(3.0)
    assert s["ours_peak_fraction"] == pytest.approx(0.5)
    assert "peer_peak_fraction" in s and "peak_gflops" in s
    assert "ours_peak_fraction" not in C.flops_summary("f", 2e9, {"ours": 3.0}, None)
