"""Batched sampling from a policy with a KV cache, and teacher-forced log-probabilities.

Generation runs as two jitted programs, each compiled once per (model config, batch size, prompt
bucket, sampling config), with the weights passed as arguments so that new weights (an RL step, a
merged model) never recompile:

1. *prefill* writes the left-padded prompts into a fresh KV cache in one forward pass and samples
   the first response token;
2. *decode* samples the remaining tokens in one `lax.while_loop`, one token per iteration, and
   stops as soon as every row has emitted EOS. Its state (the KV cache above all) is donated, so
   the cache exists once in memory and is updated in place.

Prompts are left-padded (`left_pad`): the last prompt slot of every row holds a real token, so all
rows decode in lockstep through one scalar cache index, while positions (which RoPE reads) start
at 0 on each row's first real token.

Log-probabilities. `sample` returns, for every generated token y_t, `log π_T(y_t | x, y_<t)` where
`π_T = softmax(logits / T)` over the *whole* vocabulary at the sampling temperature T: the policy
the RL objective (ratio, KL) is about. Top-k/top-p truncation changes which tokens can be drawn
but is not folded into these numbers (as in most RLHF stacks), so they match a plain
teacher-forced pass. Greedy decoding (T = 0) reports the untempered (T = 1) log-probabilities.
`sequence_logprobs` recomputes the same numbers by teacher forcing, differentiably, at any
temperature (T = 1 gives the untempered model).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.struct
import gin
import jax
import jax.numpy as jnp
import numpy as np

from warm_jax.models import transformer as tm

Array = jax.Array
PyTree = Any


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample. Hashable: every distinct value compiles its own program.

    `temperature=0` is greedy decoding. `top_k=0` and `top_p=1` disable truncation. With
    `eos_id=None` every row generates exactly `max_new_tokens` tokens.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_id: int | None = None
    pad_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 disables it)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def logprob_temperature(self) -> float:
        """The temperature of the distribution whose log-probabilities `sample` reports."""
        return 1.0 if self.greedy else float(self.temperature)


@gin.configurable
def sampling_config(**overrides: Any) -> SamplingConfig:
    """The sampling settings, configured in gin as `sampling_config.NAME = VALUE`."""
    return SamplingConfig(**overrides)


# ----------------------------------------------------------------------------- prompts


def bucket_length(n: int, bucket: int | None = 16) -> int:
    """The padded length for a longest prompt of `n` tokens: the next multiple of `bucket`, or
    the next power of two when `bucket` is None. Few distinct lengths mean few compilations."""
    if n < 1:
        raise ValueError(f"prompt length {n} must be >= 1")
    if bucket is None:
        return 1 << (n - 1).bit_length()
    if bucket < 1:
        raise ValueError(f"bucket={bucket} must be >= 1")
    return math.ceil(n / bucket) * bucket


def left_pad(
    prompts: Sequence[Sequence[int]],
    bucket: int | None = 16,
    pad_id: int = 0,
    length: int | None = None,
) -> dict[str, np.ndarray]:
    """Left-pads token lists into a prompt batch of numpy int32 arrays [B, P].

    Returns `tokens`, `segment_ids` (1 on real tokens, 0 on padding) and `positions` (0 on each
    row's first real token). P is `length` if given, else `bucket_length(longest, bucket)`.
    """
    if not prompts:
        raise ValueError("left_pad needs at least one prompt")
    lens = [len(p) for p in prompts]
    if min(lens) < 1:
        raise ValueError("every prompt needs at least one token (e.g. BOS) to condition on")
    p = bucket_length(max(lens), bucket) if length is None else length
    if max(lens) > p:
        raise ValueError(f"a prompt of {max(lens)} tokens does not fit length={p}")
    b = len(prompts)
    tokens = np.full((b, p), pad_id, np.int32)
    segment_ids = np.zeros((b, p), np.int32)
    positions = np.zeros((b, p), np.int32)
    for i, prompt in enumerate(prompts):
        n = len(prompt)
        tokens[i, p - n :] = np.asarray(prompt, np.int32)
        segment_ids[i, p - n :] = 1
        positions[i, p - n :] = np.arange(n, dtype=np.int32)
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}


# ----------------------------------------------------------------------------- samples


@flax.struct.dataclass
class Samples:
    """A batch of responses (a pytree).

    tokens [B, N] int32: the response, `pad_id` after its end.
    logprobs [B, N] float32: log π_T of each token (see the module docstring), 0 after the end.
    lengths [B] int32: generated tokens per row, EOS included.
    finished [B] bool: whether the row emitted EOS (False: cut at `max_new_tokens`).
    prompt: the prompt batch (`tokens`, `segment_ids`, `positions` [B, P]) it continues.
    """

    tokens: Array
    logprobs: Array
    lengths: Array
    finished: Array
    prompt: dict[str, Array]

    def response_mask(self) -> Array:
        """[B, N] bool: True on generated tokens (EOS included)."""
        n = self.tokens.shape[1]
        return jnp.arange(n)[None, :] < self.lengths[:, None]

    def sequences(self) -> dict[str, Array]:
        """Prompt + response as one [B, P + N] batch for teacher forcing and reward models.

        `tokens`, `segment_ids` (padding 0 on both sides), `positions` (continuing the prompt's),
        and `loss_mask` (True on response tokens). `sequence_logprobs(params, config, **seq,
        temperature=T)[:, P:]` reproduces `logprobs`; a reward model reads the last real token.
        """
        mask = self.response_mask()
        prompt = self.prompt
        n = self.tokens.shape[1]
        segment = prompt["segment_ids"][:, -1:]
        start = prompt["positions"][:, -1:] + 1
        return {
            "tokens": jnp.concatenate([prompt["tokens"], self.tokens], 1),
            "segment_ids": jnp.concatenate(
                [prompt["segment_ids"], jnp.where(mask, segment, 0)], 1
            ).astype(jnp.int32),
            "positions": jnp.concatenate(
                [prompt["positions"], start + jnp.arange(n, dtype=jnp.int32)[None, :]], 1
            ).astype(jnp.int32),
            "loss_mask": jnp.concatenate([jnp.zeros_like(prompt["tokens"], bool), mask], 1),
        }

    def to_lists(self) -> list[list[int]]:
        """The responses as Python token lists, cut at their lengths (EOS kept)."""
        tokens, lengths = np.asarray(self.tokens), np.asarray(self.lengths)
        return [row[:n].tolist() for row, n in zip(tokens, lengths)]


# ----------------------------------------------------------------------------- token choice


def filter_logits(logits: Array, top_k: int = 0, top_p: float = 1.0) -> Array:
    """Sets to -inf every logit outside the `top_k` largest, then outside the top-p nucleus of the
    distribution that is left: the smallest set of most likely tokens whose mass is >= `top_p`.
    Ties at a threshold are all kept. `top_k=0`, `top_p=1` disable each filter."""
    neg_inf = jnp.asarray(-jnp.inf, logits.dtype)
    if 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits >= kth, logits, neg_inf)
    if top_p < 1.0:
        probs = jax.nn.softmax(logits, axis=-1)
        sorted_probs = jnp.flip(jnp.sort(probs, axis=-1), axis=-1)
        # A token is in the nucleus iff the mass of the tokens ranked above it is still < top_p.
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(sorted_probs, kept - 1, axis=-1)
        logits = jnp.where(probs >= threshold, logits, neg_inf)
    return logits


def first_argmax(x: Array) -> Array:
    """`jnp.argmax(x, axis=-1)` (the first index of the largest value, a NaN counting as the
    largest), as two plain reductions. XLA:CPU runs argmax's (value, index) reduction one element
    at a time and fuses the producer of `x` into it: drawing a token from Gumbel-perturbed logits
    that way took 3x as long as generating the noise (a third of a tiny model's decode step)."""
    n = x.shape[-1]
    hit = (x == jnp.max(x, axis=-1, keepdims=True)) | jnp.isnan(x)
    return jnp.min(jnp.where(hit, jnp.arange(n, dtype=jnp.int32), n), axis=-1)


def choose_tokens(logits: Array, rng: Array, cfg: SamplingConfig) -> tuple[Array, Array]:
    """One token per row from last-position logits [B, V]: (tokens [B], log π_T [B])."""
    logits = logits.astype(jnp.float32)
    if cfg.greedy:
        tokens = first_argmax(logits)
    else:
        logits = logits / cfg.temperature
        # The Gumbel-max draw of `jax.random.categorical(rng, ...)`, same noise, same tokens.
        noise = jax.random.gumbel(rng, logits.shape, logits.dtype)
        tokens = first_argmax(filter_logits(logits, cfg.top_k, cfg.top_p) + noise)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return tokens.astype(jnp.int32), jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


# ----------------------------------------------------------------------------- generation


class _DecodeState(NamedTuple):
    step: Array  # () int32: index of the next response token to sample
    tokens: Array  # [B, N]
    logprobs: Array  # [B, N]
    lengths: Array  # [B]
    done: Array  # [B] bool: EOS already emitted
    cache: PyTree
    rng: Array
    start_positions: Array  # [B]: position of response token 0
    segment: Array  # [B]: the segment the response continues


def _last_logits(params: PyTree, config: tm.TransformerConfig, hidden: Array) -> Array:
    # Only the last slot's logits are needed: projecting all P prompt slots onto the vocabulary
    # would cost B·P·V floats (gigabytes for a 50k vocabulary).
    return tm.Transformer(config).apply(params, hidden, method=tm.Transformer.logits)


@functools.partial(jax.jit, static_argnames=("config", "cfg"))
def _prefill(
    params: PyTree, config: tm.TransformerConfig, prompt: dict, rng: Array, cfg: SamplingConfig
) -> _DecodeState:
    b, p = prompt["tokens"].shape
    n = cfg.max_new_tokens
    # Response token N-1 is never fed back, so P + N - 1 slots hold everything attended to.
    cache = tm.init_cache(config, b, p + n - 1)
    hidden, cache = tm.apply(
        params,
        config,
        prompt["tokens"],
        positions=prompt["positions"],
        segment_ids=prompt["segment_ids"],
        cache=cache,
        output="hidden",
    )
    logits = _last_logits(params, config, hidden[:, -1:])[:, 0]
    first, logp = choose_tokens(logits, jax.random.fold_in(rng, 0), cfg)
    done = jnp.zeros((b,), bool) if cfg.eos_id is None else first == cfg.eos_id
    return _DecodeState(
        step=jnp.ones((), jnp.int32),
        tokens=jnp.full((b, n), cfg.pad_id, jnp.int32).at[:, 0].set(first),
        logprobs=jnp.zeros((b, n), jnp.float32).at[:, 0].set(logp),
        lengths=jnp.ones((b,), jnp.int32),
        done=done,
        cache=cache,
        rng=rng,
        start_positions=prompt["positions"][:, -1].astype(jnp.int32) + 1,
        segment=prompt["segment_ids"][:, -1].astype(jnp.int32),
    )


@functools.partial(jax.jit, static_argnames=("config", "cfg"), donate_argnames=("state",))
def _decode(
    params: PyTree, config: tm.TransformerConfig, state: _DecodeState, cfg: SamplingConfig
) -> _DecodeState:
    n = cfg.max_new_tokens

    def unfinished(s: _DecodeState) -> Array:
        return (s.step < n) & ~jnp.all(s.done)

    def step(s: _DecodeState) -> _DecodeState:
        prev = jax.lax.dynamic_slice_in_dim(s.tokens, s.step - 1, 1, axis=1)
        logits, cache = tm.apply(
            params,
            config,
            prev,
            positions=(s.start_positions + s.step - 1)[:, None],
            segment_ids=s.segment[:, None],
            cache=s.cache,
        )
        token, logp = choose_tokens(logits[:, 0], jax.random.fold_in(s.rng, s.step), cfg)
        # Finished rows keep running in lockstep (the batch shares one cache index) but emit pad.
        token = jnp.where(s.done, cfg.pad_id, token)
        logp = jnp.where(s.done, 0.0, logp)
        done = s.done if cfg.eos_id is None else s.done | (token == cfg.eos_id)
        return s._replace(
            step=s.step + 1,
            tokens=jax.lax.dynamic_update_slice_in_dim(s.tokens, token[:, None], s.step, axis=1),
            logprobs=jax.lax.dynamic_update_slice_in_dim(s.logprobs, logp[:, None], s.step, axis=1),
            lengths=s.lengths + (~s.done).astype(jnp.int32),
            done=done,
            cache=cache,
        )

    return jax.lax.while_loop(unfinished, step, state)


def sample(
    params: PyTree,
    model_config: tm.TransformerConfig,
    prompt_batch: dict[str, Any],
    rng: Array | int,
    cfg: SamplingConfig,
) -> Samples:
    """Samples up to `cfg.max_new_tokens` tokens after each left-padded prompt.

    `prompt_batch` holds `tokens`, `segment_ids`, `positions` [B, P] (see `left_pad`); its arrays
    may be sharded over the batch and `params` over the model (the programs follow the inputs'
    shardings). The result depends only on the weights, prompts, `rng` (a key or an int seed)
    and `cfg`, not on the sharding.
    """
    prompt = {
        k: jnp.asarray(prompt_batch[k], jnp.int32) for k in ("tokens", "segment_ids", "positions")
    }
    last = prompt["segment_ids"][:, -1]
    if not isinstance(last, jax.core.Tracer) and not bool(jnp.all(last != 0)):
        raise ValueError("prompts must be left-padded: every row's last slot must be a real token")
    if isinstance(rng, (int, np.integer)):
        rng = jax.random.PRNGKey(rng)
    state = _prefill(params, model_config, prompt, rng, cfg)
    state = _decode(params, model_config, state, cfg)
    return Samples(
        tokens=state.tokens,
        logprobs=state.logprobs,
        lengths=state.lengths,
        finished=state.done,
        prompt=prompt,
    )


# ----------------------------------------------------------------------------- teacher forcing


def teacher_forced_logits(
    params: PyTree,
    config: tm.TransformerConfig,
    tokens: Array,
    segment_ids: Array,
    positions: Array,
    temperature: float | Array = 1.0,
    first: int = 1,
) -> Array:
    """The tempered float32 logits that predict `tokens[:, first:]`, [B, T - first, V]: one
    forward pass, and the vocabulary projection only at the slots whose next token is scored.
    RL scores responses only (`first` = the prompt length): projecting the prompt's slots too
    would cost B·P·V floats of logits and their softmax, in every one of a step's passes."""
    t = tokens.shape[1]
    if not 1 <= first < t:
        raise ValueError(f"first={first}: the first scored token must be in [1, {t})")
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 (greedy scores at 1.0)")
    hidden = tm.apply(
        params, config, tokens, positions=positions, segment_ids=segment_ids, output="hidden"
    )
    logits = tm.Transformer(config).apply(
        params, hidden[:, first - 1 : -1], method=tm.Transformer.logits
    )
    return logits.astype(jnp.float32) / temperature


def sequence_logprobs(
    params: PyTree,
    config: tm.TransformerConfig,
    tokens: Array,
    segment_ids: Array,
    positions: Array,
    loss_mask: Array,
    temperature: float | Array = 1.0,
    first: int = 1,
) -> Array:
    """Per-token log π_T(tokens[t] | tokens[<t]) by teacher forcing, [B, T] float32.

    Entry t scores token t (entries before `first` and every entry where `loss_mask` is False
    are 0), with `π_T = softmax(logits / temperature)` over the whole vocabulary. Pure and
    differentiable: RL recomputes the sampler's log-probabilities under gradient with it. Takes
    the output of `Samples.sequences()` as keyword arguments; `first` (static) may be the prompt
    length, which no entry of the response mask precedes.
    """
    logits = teacher_forced_logits(
        params, config, tokens, segment_ids, positions, temperature, first
    )
    return scored_logprobs(logits, tokens, loss_mask, first)


def scored_logprobs(logits: Array, tokens: Array, loss_mask: Array, first: int) -> Array:
    """[B, T] log-softmax of `teacher_forced_logits(..., first)` at each next token: 0 before
    `first` and wherever `loss_mask` is False."""
    picked = jnp.take_along_axis(logits, tokens[:, first:, None], axis=-1)[..., 0]
    logp = jnp.pad(picked - jax.nn.logsumexp(logits, axis=-1), ((0, 0), (first, 0)))
    # `where`, not a product: a masked slot's value never reaches the result or its gradient.
    return jnp.where(loss_mask, logp, 0.0)


# ----------------------------------------------------------------------------- text in, text out


@dataclasses.dataclass
class TextSamples:
    """Decoded responses to text prompts: `responses` (EOS and padding dropped, stripped),
    `lengths` (generated tokens, EOS included) and `finished` (emitted EOS), one per prompt."""

    responses: list[str]
    lengths: np.ndarray
    finished: np.ndarray


def sample_texts(
    params: PyTree,
    config: tm.TransformerConfig,
    tokenizer: Any,
    prompts: Sequence[str],
    cfg: SamplingConfig,
    seed: int,
    chunk: int = 256,
) -> TextSamples:
    """One response per text prompt (`<bos> prompt`), decoded, in chunks of `chunk` prompts.

    Chunk j draws with `fold_in(PRNGKey(seed), j)` and every chunk is padded to the same prompt
    length, so all chunks share one compiled program."""
    if not prompts:
        raise ValueError("sample_texts needs at least one prompt")
    encoded = [[tokenizer.bos_id, *tokenizer.encode(p)] for p in prompts]
    length = bucket_length(max(len(e) for e in encoded))
    key = jax.random.PRNGKey(seed)
    responses: list[str] = []
    lengths, finished = [], []
    for j, start in enumerate(range(0, len(encoded), chunk)):
        rows = encoded[start : start + chunk]
        n_real = len(rows)
        if start and n_real < chunk:
            rows = rows + [rows[-1]] * (chunk - n_real)
        batch = left_pad(rows, pad_id=tokenizer.pad_id, length=length)
        out = sample(params, config, batch, jax.random.fold_in(key, j), cfg)
        tokens = np.asarray(out.tokens)[:n_real]
        n_tok = np.asarray(out.lengths)[:n_real]
        responses += [
            tokenizer.decode([t for t in row[:n] if t != cfg.eos_id]).strip()
            for row, n in zip(tokens, n_tok)
        ]
        lengths.append(n_tok)
        finished.append(np.asarray(out.finished)[:n_real])
    return TextSamples(responses, np.concatenate(lengths), np.concatenate(finished))
