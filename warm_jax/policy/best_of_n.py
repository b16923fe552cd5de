"""Best-of-N: draw N_max responses per prompt once, then estimate, for every n ≤ N_max, the
control reward of the response a proxy reward ranks best among n, without bias.

Estimator. For one prompt, sort the N = N_max draws by proxy reward, ascending:
p_(1) ≤ … ≤ p_(N), with control rewards c_(1..N) carried along. A best-of-n draw is a uniformly
random n-subset (n draws without replacement); it keeps the element of highest proxy rank. The
highest rank in the subset is i with probability C(i-1, n-1) / C(N, n) (the subset holds i and
n-1 of the i-1 elements below it), so

    E[control of best-of-n] = Σ_{i=n}^{N} C(i-1, n-1) / C(N, n) · c_(i)

(and the same weights on p_(i) give the expected proxy reward of the selected response). Proxy
ties are broken uniformly at random, which amounts to replacing the control rewards of a tied
group by their mean. n = 1 is the mean over all draws; n = N picks the proxy argmax.

KL. Best-of-n of a policy π has KL(π_BoN ‖ π) = log n - (n-1)/n (the standard upper bound,
exact without ties): the x-axis of WARM's Fig. 6.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from warm_jax.data.tokenizer import Tokenizer
from warm_jax.models import transformer as tm
from warm_jax.policy import sampling
from warm_jax.policy.rewards import Reward, decode_batch

PyTree = Any
PROMPT_KEYS = ("tokens", "segment_ids", "positions")
CONTROL = "\0control"  # a key no proxy name can take


def bon_kl(n: int | np.ndarray) -> np.ndarray:
    """KL(best-of-n ‖ π) = log n - (n-1)/n."""
    n = np.asarray(n, np.float64)
    return np.log(n) - (n - 1) / n


def best_of_n_weights(num_draws: int, n: int) -> np.ndarray:
    """w_i = C(i-1, n-1) / C(N, n), i = 1..N: the probability that the draw of proxy rank i
    (ascending) is the best of a uniformly random n-subset. Sums to 1; exact rationals → float64."""
    if not 1 <= n <= num_draws:
        raise ValueError(f"best-of-n needs 1 <= n <= N, got n={n}, N={num_draws}")
    total = math.comb(num_draws, n)
    return np.array([math.comb(i - 1, n - 1) / total for i in range(1, num_draws + 1)])


def _tie_averaged(sorted_proxy: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Replaces each run of equal proxy values' `values` by their mean (random tie-breaking)."""
    out = values.astype(np.float64).copy()
    start = 0
    n = len(sorted_proxy)
    for i in range(1, n + 1):
        if i == n or sorted_proxy[i] != sorted_proxy[start]:
            if i - start > 1:
                out[start:i] = out[start:i].mean()
            start = i
    return out


def best_of_n_expectation(proxy: np.ndarray, control: np.ndarray, n: int) -> np.ndarray:
    """Expected control reward of the proxy's best of n draws without replacement, per prompt.

    `proxy`, `control` [P, N] (N draws per prompt) -> [P] float64. See the module docstring."""
    proxy, control = np.atleast_2d(proxy), np.atleast_2d(control)
    if proxy.shape != control.shape:
        raise ValueError(f"proxy {proxy.shape} and control {control.shape} shapes differ")
    w = best_of_n_weights(proxy.shape[1], n)
    out = np.empty(proxy.shape[0])
    for j, (p, c) in enumerate(zip(proxy, control)):
        order = np.argsort(p, kind="stable")
        out[j] = w @ _tie_averaged(p[order], c[order])
    return out


def powers_of_two(n_max: int) -> list[int]:
    """1, 2, 4, … up to n_max (n_max itself included even if not a power of two)."""
    ns = [1 << i for i in range(int(math.log2(n_max)) + 1) if (1 << i) <= n_max]
    return ns if ns[-1] == n_max else [*ns, n_max]


def bon_curves(
    proxies: Mapping[str, np.ndarray], control: np.ndarray, ns: Sequence[int]
) -> dict[str, Any]:
    """For each proxy [P, N]: mean (over prompts) and standard error of the control reward and
    of the proxy reward of best-of-n, for n in `ns`, with the KL of each n."""
    out: dict[str, Any] = {"n": list(ns), "kl": bon_kl(np.asarray(ns)).tolist(), "curves": {}}
    p_count = control.shape[0]
    for name, proxy in proxies.items():
        ctl = np.stack([best_of_n_expectation(proxy, control, n) for n in ns])  # [len(ns), P]
        prx = np.stack([best_of_n_expectation(proxy, proxy, n) for n in ns])
        sem = ctl.std(axis=1, ddof=1) / np.sqrt(p_count) if p_count > 1 else np.zeros(len(ns))
        out["curves"][name] = {
            "control": ctl.mean(1).tolist(),
            "control_sem": sem.tolist(),
            "control_gain": (ctl.mean(1) - ctl.mean(1)[0]).tolist(),
            "proxy": prx.mean(1).tolist(),
        }
    return out


# ----------------------------------------------------------------------------- drawing


def draw_and_score(
    params: PyTree,
    config: tm.TransformerConfig,
    prompts: Mapping[str, np.ndarray],
    num_draws: int,
    rewards: Mapping[str, Reward],
    control: Reward,
    cfg: sampling.SamplingConfig,
    seed: int = 0,
    chunk_rows: int = 256,
    tokenizer: Tokenizer | None = None,
) -> dict[str, Any]:
    """Samples `num_draws` responses for each prompt row and scores every one with each reward
    of `rewards` and with `control`. Returns `proxy` {name: [P, N]}, `control` [P, N],
    `lengths` [P, N], and with a tokenizer `texts` (prompts [P], responses [P][N])."""
    p_count, plen = np.shape(prompts["tokens"])
    rows = {k: np.repeat(np.asarray(prompts[k]), num_draws, axis=0) for k in PROMPT_KEYS}
    total = p_count * num_draws
    chunk = min(chunk_rows, total)
    pad = -total % chunk
    rows = {k: np.concatenate([v, v[:pad]]) for k, v in rows.items()}
    scorers = {**rewards, CONTROL: control}
    # Python rewards are scored on the host (see `Reward.host_fn`), the others in the program.
    in_jit = [k for k, r in scorers.items() if r.host_fn is None]
    on_host = [k for k, r in scorers.items() if r.host_fn is not None]

    @jax.jit
    def draw(params, reward_params, prompt, rng):
        s = sampling.sample(params, config, prompt, rng, cfg)
        seq = s.sequences()
        scores = {k: scorers[k].fn(reward_params[k], seq, plen) for k in in_jit}
        return s.lengths, scores, {k: seq[k] for k in ("tokens", "segment_ids", "loss_mask")}

    reward_params = {k: scorers[k].params for k in in_jit}
    outs: dict[str, list] = {"scores": [], "lengths": [], "responses": []}
    for i in range(0, total + pad, chunk):
        batch = {k: v[i : i + chunk] for k, v in rows.items()}
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), i // chunk)
        lengths, scores, seq = jax.device_get(draw(params, reward_params, batch, rng))
        for k in on_host:
            scores[k] = scorers[k].score_on_host(seq, plen)
        outs["scores"].append(scores)
        outs["lengths"].append(np.asarray(lengths))
        if tokenizer is not None:
            _, responses = decode_batch(
                tokenizer, seq["tokens"], seq["segment_ids"], seq["loss_mask"], plen
            )
            outs["responses"].extend(responses)

    def cat(xs):
        return np.concatenate(xs)[:total].reshape(p_count, num_draws)

    result = {
        "proxy": {n: cat([s[n] for s in outs["scores"]]) for n in rewards},
        "control": cat([s[CONTROL] for s in outs["scores"]]),
        "lengths": cat(outs["lengths"]),
    }
    if tokenizer is not None:
        prompt_texts, _ = decode_batch(
            tokenizer,
            np.asarray(prompts["tokens"]),
            np.asarray(prompts["segment_ids"]),
            np.zeros_like(np.asarray(prompts["tokens"]), bool),
            plen,
        )
        flat = outs["responses"][:total]
        result["texts"] = {
            "prompts": prompt_texts,
            "responses": [flat[j * num_draws : (j + 1) * num_draws] for j in range(p_count)],
        }
    return result


def plot_bon(result: Mapping[str, Any], out_png: str | os.PathLike, title: str = "") -> Path:
    """Control reward (left) and proxy reward (right) of best-of-n against KL = log n-(n-1)/n."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kl = np.asarray(result["kl"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, c in result["curves"].items():
        mean, sem = np.asarray(c["control"]), np.asarray(c["control_sem"])
        (line,) = axes[0].plot(kl, mean, marker="o", label=name)
        axes[0].fill_between(kl, mean - sem, mean + sem, color=line.get_color(), alpha=0.2)
        axes[1].plot(kl, c["proxy"], marker="o", label=name)
    axes[0].set_ylabel("control reward of the selected response")
    axes[1].set_ylabel("proxy reward of the selected response")
    for ax in axes:
        ax.set_xlabel("KL = log n - (n-1)/n")
        ax.grid(alpha=0.3)
        ax.legend()
    top = axes[0].secondary_xaxis("top")
    top.set_ticks(kl, labels=[str(n) for n in result["n"]])
    top.set_xlabel("n")
    fig.suptitle(title or "best-of-n")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
