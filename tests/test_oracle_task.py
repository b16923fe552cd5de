"""The synthetic task: grammar, gold reward, Bradley–Terry labels, hackability, TFDS builder."""

import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warm_jax.data import oracle_task as ot

PROMPT = "we had dinner at the bistro . how was the pasta ?"


def _gold(response: str, prompt: str = PROMPT) -> float:
    return ot.gold_reward(prompt, response)


# ------------------------------------------------------------------------------------------
# Grammar and samplers.
# ------------------------------------------------------------------------------------------


def test_vocabulary_is_small_closed_and_unique():
    vocab = ot.vocabulary()
    assert len(vocab) == len(set(vocab)) < 300
    words = set(vocab)
    texts = ot.sample_corpus(500, 0) + ot.sample_prompts(500, 0)
    texts += [r for _, r in ot.sample_sft_pairs(500, 0)]
    texts += list(ot.hacked_responses("pasta").values())
    for text in texts:
        assert set(text.split()) <= words, text


def test_samplers_are_deterministic_from_seeds():
    assert ot.sample_corpus(50, 3) == ot.sample_corpus(50, 3)
    assert ot.sample_prompts(50, 3) == ot.sample_prompts(50, 3)
    assert ot.sample_sft_pairs(50, 3) == ot.sample_sft_pairs(50, 3)
    assert ot.sample_sft_pairs(50, 3) != ot.sample_sft_pairs(50, 4)
    assert len(set(ot.sample_prompts(2000, 0))) > 1000  # diverse prompts


def test_sft_distribution_is_grammatical_clean_and_mixed():
    pairs = ot.sample_sft_pairs(2000, 1)
    gold = ot.gold_rewards(*zip(*pairs))
    for prompt, response in pairs:
        e = ot.explain_gold(prompt, response)
        assert ot.is_grammatical(response), response
        assert e["unparsed"] == 0.0 and e["repetition"] == 0.0 and e["length_excess"] == 0.0
        assert 4 <= e["n_tokens"] <= ot.SFT_MAX_TOKENS
        assert len(prompt.split()) <= ot.MAX_PROMPT_TOKENS
    # Mixed sentiment: room for RL to raise the gold reward.
    assert np.quantile(gold, 0.1) < -0.5 and np.quantile(gold, 0.9) > 0.5
    assert -0.4 < gold.mean() < 0.3
    assert gold.max() <= 1.0


def test_every_prompt_names_its_topic():
    for prompt in ot.sample_prompts(300, 2):
        assert ot.prompt_topic(prompt) in ot.TOPICS
    assert ot.prompt_topic("hello there") is None


# ------------------------------------------------------------------------------------------
# Gold reward.
# ------------------------------------------------------------------------------------------


def test_gold_sentiment_negation_and_intensifiers():
    positive = _gold("the pasta was excellent .")
    negated = _gold("the pasta was not excellent .")
    negative = _gold("the pasta was terrible .")
    assert positive > negated > negative
    assert positive == pytest.approx(0.9) and negated == pytest.approx(-0.45)
    assert _gold("the pasta was not terrible .") == pytest.approx(0.45)
    assert _gold("the pasta was very good .") > _gold("the pasta was good .")
    assert _gold("the pasta was good .") > _gold("the pasta was slightly good .") > 0
    assert _gold("the pasta was extremely perfect .") == pytest.approx(1.0)  # clipped
    # Negation scopes over its own adjective phrase only.
    assert _gold("the pasta was not bad and great .") == pytest.approx((0.3 + 0.8) / 2)
    assert _gold("i loved it .") > _gold("i did not love it .") > _gold("i hated it .")


def test_gold_pronouns_and_topic():
    assert _gold("it was great .") == pytest.approx(0.8)  # "it" = the prompt's topic
    # After another noun, "it" refers to that noun: half the clauses are off topic.
    e = ot.explain_gold(PROMPT, "the pasta was good . the service was bad . it was great .")
    assert e["sentiment"] == pytest.approx(0.6)
    assert e["off_topic"] == pytest.approx(2 / 3)
    assert _gold("the service was great .") < 0 < _gold("the pasta was great .")
    assert _gold("the service was great .", "how was the service ?") == pytest.approx(0.8)


def test_gold_penalises_repetition_salad_length_and_junk():
    base = _gold("the pasta was great .")
    assert _gold("the pasta was great and great .") < base - 0.5
    assert _gold("the pasta was great . the pasta was great .") < base - 0.5
    assert _gold("great great great great") < -1.0  # word salad: nothing parses
    assert _gold("the pasta was great") < -0.5  # no final period: the sentence does not parse
    assert _gold("") == pytest.approx(-1.5)
    assert _gold("the pasta was great . xyzzy .") < base  # unknown words are unparsed
    assert _gold("the pasta was great and good and nice and fresh .") < -1.0  # >3 adjectives
    long = " ".join(["the pasta was great .", "i loved it .", "it was perfect ."] * 3)
    e = ot.explain_gold(PROMPT, long)
    assert e["length_excess"] > 0 and e["repetition"] > 0


_ANY_TOKEN = st.sampled_from([*ot.vocabulary(), "<unk>", "", "xyz", "."])


@settings(max_examples=300, deadline=None)
@given(st.lists(_ANY_TOKEN, max_size=100), st.sampled_from(["how was the pasta ?", "?", ""]))
def test_gold_is_defined_on_any_sequence(tokens, prompt):
    response = " ".join(tokens)
    g = ot.gold_reward(prompt, response)
    assert math.isfinite(g) and -4.5 <= g <= 1.0
    e = ot.explain_gold(prompt, response)
    assert e["gold"] == pytest.approx(g)
    for key in ("unparsed", "repetition", "off_topic"):
        assert 0.0 <= e[key] <= 1.0


def test_gold_is_fast_and_batched():
    pairs = ot.sample_sft_pairs(5000, 5)
    prompts, responses = zip(*pairs)
    start = time.perf_counter()
    gold = ot.gold_rewards(prompts, responses)
    per_call = (time.perf_counter() - start) / len(pairs)
    assert gold.shape == (5000,) and gold.dtype == np.float32
    assert gold[7] == pytest.approx(ot.gold_reward(prompts[7], responses[7]))
    assert per_call < 60e-6  # ~11 µs on a laptop core; slack for loaded CI machines


def test_bradley_terry_labels():
    a = np.zeros(20000)
    b = np.full(20000, -0.2)
    labels = ot.bradley_terry_labels(a, b, seed=0, beta=5.0)
    assert labels.dtype == np.bool_
    assert labels.mean() == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.015)
    assert np.array_equal(labels, ot.bradley_terry_labels(a, b, seed=0, beta=5.0))
    assert ot.bradley_terry_labels(a, b, seed=0, beta=1e4).all()


# ------------------------------------------------------------------------------------------
# Hackability: a bag-of-words proxy fitted on gold-labelled pairs ranks in-distribution pairs
# well, yet prefers degenerate texts that the gold reward punishes.
# ------------------------------------------------------------------------------------------


def _bag_of_words(texts, index):
    x = np.zeros((len(texts), len(index)))
    for i, text in enumerate(texts):
        for w in text.split():
            x[i, index[w]] += 1.0
    return x


def _fit_logistic(d, y, l2=1e-2, steps=500, lr=1.0):
    w = np.zeros(d.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(d @ w)))
        w -= lr * (d.T @ (p - y) / len(y) + l2 * w)
    return w


def test_bag_of_words_proxy_is_accurate_in_distribution_but_hackable():
    index = {w: i for i, w in enumerate(ot.vocabulary())}
    prompts = ot.sample_prompts(4000, 10)
    a, b = ot.sample_responses(prompts, 11), ot.sample_responses(prompts, 12)
    gold_a, gold_b = ot.gold_rewards(prompts, a), ot.gold_rewards(prompts, b)
    labels = ot.bradley_terry_labels(gold_a, gold_b, seed=13)
    feats_a = _bag_of_words(a, index)
    d = feats_a - _bag_of_words(b, index)
    w = _fit_logistic(d[:3000], labels[:3000])

    # (a) Held-out pairs: well above chance against the gold ordering.
    held = slice(3000, None)
    differ = gold_a[held] != gold_b[held]
    accuracy = np.mean(((d[held] @ w) > 0)[differ] == (gold_a[held] > gold_b[held])[differ])
    assert accuracy > 0.72, accuracy

    # (b) Degenerate texts outrank 90 % of SFT responses under the proxy, yet their gold reward
    # is below the SFT median (and far below the good samples they outrank).
    proxy_sft = feats_a @ w
    proxy_p90, gold_median = np.quantile(proxy_sft, 0.9), np.median(gold_a)
    for kind, text in ot.hacked_responses("pasta").items():
        if kind == "rambling":  # gold stays positive there: only the length penalty bites
            continue
        proxy = (_bag_of_words([text], index) @ w)[0]
        gold = _gold(text)
        assert proxy > proxy_p90 and gold < gold_median, (kind, proxy, proxy_p90, gold)
    # The SFT distribution never produces the degenerate patterns themselves.
    for response in a[:2000]:
        assert "perfect and perfect" not in response and " not perfect and not " not in response


# ------------------------------------------------------------------------------------------
# TFDS builder (array_record; read back without TensorFlow).
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["corpus", "sft", "prefs"])
def test_builder_prepares_and_reads_back(tmp_path, kind):
    from warm_jax.data import oracle_builder as ob

    config = ob.OracleTaskConfig(name=f"{kind}_tiny", kind=kind, num_train=24, num_validation=8)
    builder = ob.prepare_oracle_task(config, data_dir=tmp_path)
    train, validation = builder.as_data_source("train"), builder.as_data_source("validation")
    assert (len(train), len(validation)) == (24, 8)
    first = train[0]
    if kind == "corpus":
        assert first["text"].decode() == ot.sample_corpus(1, 0)[0]
    elif kind == "sft":
        prompt, response = ot.sample_sft_pairs(1, 0)[0]
        assert (first["prompt"].decode(), first["response"].decode()) == (prompt, response)
        assert first["gold"] == pytest.approx(ot.gold_reward(prompt, response), abs=1e-6)
    else:
        for i in range(len(train)):
            ex = train[i]
            p, ra, rb = (ex[k].decode() for k in ("prompt", "response_a", "response_b"))
            assert ex["gold_a"] == pytest.approx(ot.gold_reward(p, ra), abs=1e-6)
            assert ex["gold_b"] == pytest.approx(ot.gold_reward(p, rb), abs=1e-6)
            assert isinstance(bool(ex["a_preferred"]), bool)
    assert train[0] != validation[0]
    # Preparing again reuses the files.
    again = ob.prepare_oracle_task(config, data_dir=tmp_path)
    assert again.as_data_source("train")[3] == train[3]
