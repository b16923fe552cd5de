"""SFT: the response-only loss mask, learning from demonstrations, kept intermediate checkpoints,
starting from the pretrained weights, and clean errors for a bad `init_from`."""

import argparse
import json

import chex
import gin
import jax
import numpy as np
import pytest

from warm_jax.data.tokenizer import train_tokenizer
from warm_jax.errors import UserError
from warm_jax.experiments import pretrain as pretrain_lib
from warm_jax.experiments import sft as sft_lib
from warm_jax.models import transformer as tm
from warm_jax.training import checkpoints, lm

TINY_MODEL = {
    "vocab_size": 192,  # room for the oracle language's words, so few are <unk>
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "head_dim": 8,
    "d_ff": 64,
    "max_len": 64,
}
SFT_LR = 1e-2
NUM_STEPS, KEEP_EVERY = 7, 3
EVAL_SEED = 1001


def _bind_tiny_model() -> None:
    for k, v in TINY_MODEL.items():
        gin.bind_parameter(f"model_config.{k}", v)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 5-step pretrain workdir: enough to have model.json, tokenizer/ and a checkpoint."""
    wd = tmp_path_factory.mktemp("pretrain")
    gin.clear_config()
    _bind_tiny_model()
    gin.bind_parameter("pretrain/train.num_steps", 5)
    gin.bind_parameter("pretrain/train.checkpoint_every", 5)
    # Not the SFT loop's seed (0): an SFT that silently started from a fresh init would differ.
    gin.bind_parameter("pretrain/train.seed", 7)
    pretrain_lib.pretrain(
        wd, num_documents=400, seq_len=32, batch_size=16, validation_fraction=0.2, progress=False
    )
    gin.clear_config()
    return wd


@pytest.fixture(scope="module")
def sft_run(pretrained, tmp_path_factory):
    wd = tmp_path_factory.mktemp("sft")
    gin.clear_config()
    gin.bind_parameter("sft/train.num_steps", NUM_STEPS)
    gin.bind_parameter("sft/train.log_every", 1)
    gin.bind_parameter("sft/make_optimizer.learning_rate", SFT_LR)
    gin.bind_parameter("sft/make_optimizer.warmup_steps", 0)
    result = sft_lib.sft(
        wd,
        init_from=pretrained,
        num_pairs=400,
        num_eval_pairs=64,
        eval_seed=EVAL_SEED,
        seq_len=48,
        batch_size=16,
        keep_every=KEEP_EVERY,
        num_sample_prompts=8,
        max_new_tokens=8,
        progress=False,
    )
    gin.clear_config()
    return result


def test_loss_mask_covers_exactly_the_response_and_eos():
    tok = train_tokenizer(["how was the soup ? the soup was good ."], 32, kind="word")
    ids = {w: tok.token_to_id(w) for w in ("how", "was", "the", "soup", "?", "good", ".")}
    pairs = [("how was the soup ?", "the soup was good ."), ("how was the soup ?", "good " * 12)]
    arrays, dropped = sft_lib.encode_sft_pairs(pairs, tok, seq_len=16)
    assert dropped == 1 and arrays["tokens"].shape == (1, 16)  # 1 + 5 + 12 + 1 > 16
    # <bos> how was the soup ? | the soup was good . <eos> | pad x4
    prompt = [ids[w] for w in ("how", "was", "the", "soup", "?")]
    response = [ids[w] for w in ("the", "soup", "was", "good", ".")]
    expected = [tok.bos_id, *prompt, *response, tok.eos_id] + [tok.pad_id] * 4
    np.testing.assert_array_equal(arrays["tokens"][0], expected)
    np.testing.assert_array_equal(arrays["loss_mask"][0], [0] * 6 + [1] * 6 + [0] * 4)
    np.testing.assert_array_equal(arrays["segment_ids"][0], [1] * 12 + [0] * 4)
    np.testing.assert_array_equal(arrays["positions"][0, :12], np.arange(12))
    # What the loss counts: the targets "the soup was good . <eos>", i.e. next-token slots 5..10.
    logits = np.zeros((1, 16, tok.vocab_size), np.float32)
    _, weight = lm.next_token_nll(logits, arrays)
    np.testing.assert_array_equal(np.asarray(weight[0]), [0] * 5 + [1] * 6 + [0] * 4)


def test_sft_lowers_the_held_out_response_nll(sft_run, pretrained):
    summary = json.loads((sft_run.workdir / sft_lib.EVAL_FILE).read_text())
    before, after = summary["initial"]["response_nll"], summary["final"]["response_nll"]
    assert after < before - 0.3, (before, after)
    # "initial" is the pretrained model's, measured independently here.
    config, tok, params = sft_lib.load_model(pretrained)
    eval_arrays, _ = sft_lib.encode_sft_pairs(sft_lib.load_pairs("oracle", 64, EVAL_SEED), tok, 48)
    nll = sft_lib.response_nll_fn(config, eval_arrays, 16)
    assert nll(params) == pytest.approx(before, rel=1e-5)
    assert nll(sft_run.params) == pytest.approx(after, rel=1e-5)
    for when in ("initial", "final"):
        assert np.isfinite(summary[when]["gold_reward_mean"])
        assert len(summary[when]["examples"]) == 4
    # The eval curve is in the metrics too.
    evals = [r for r in sft_run.history if "eval/response_nll" in r]
    assert [r["step"] for r in evals] == [NUM_STEPS]


def test_intermediate_checkpoints_are_kept_and_load(sft_run):
    wd = sft_run.workdir
    # Every KEEP_EVERY steps and the last; Orbax also saves the first step of a fresh run.
    assert sft_lib.sft_checkpoint_steps(wd) == [1, 3, 6, 7]
    p3 = jax.device_get(sft_lib.load_model(wd, step=3)[2])
    p6 = jax.device_get(sft_lib.load_model(wd, step=6)[2])
    p7 = jax.device_get(sft_lib.load_model(wd, step=7)[2])
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p3), jax.tree.leaves(p6)))
    assert diff > 1e-3
    chex.assert_trees_all_equal(p7, jax.device_get(sft_run.params))
    # The SFT workdir loads like a pretrain one: latest step by default, model files beside it.
    chex.assert_trees_all_equal(jax.device_get(sft_lib.load_model(wd)[2]), p7)
    assert json.loads((wd / "model.json").read_text())["d_model"] == TINY_MODEL["d_model"]
    with pytest.raises(UserError, match="no checkpoint at step 4"):
        sft_lib.load_model(wd, step=4)


def test_sft_starts_from_the_pretrained_parameters(sft_run, pretrained):
    config, _, pre = sft_lib.load_model(pretrained)
    pre = jax.device_get(pre)
    p1 = jax.device_get(sft_lib.load_model(sft_run.workdir, step=1)[2])
    fresh = jax.device_get(jax.jit(tm.init_params, static_argnums=0)(config, jax.random.PRNGKey(0)))

    def max_diff(a, b):
        return max(
            float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
        )

    # Adam's first update is g / (|g| + eps) per coordinate, times lr (no warmup, no decay here):
    # after one step every parameter is within lr of where SFT started.
    assert max_diff(p1, pre) <= SFT_LR * (1 + 1e-4)
    assert max_diff(p1, pre) > SFT_LR * 0.5
    assert max_diff(p1, fresh) > 10 * SFT_LR
    meta = checkpoints.load_metadata(sft_run.workdir / "checkpoints" / "1")
    assert meta["init_from"] == str(pretrained.resolve())


def test_bad_init_from_is_a_user_error_naming_it(tmp_path):
    parser = argparse.ArgumentParser()
    sft_lib.add_arguments(parser)
    missing = tmp_path / "no_such_run"
    args = parser.parse_args(["--workdir", str(tmp_path / "w"), "--init_from", str(missing)])
    args.gin_bindings = []
    with pytest.raises(UserError, match=r"no_such_run.*does not exist"):
        sft_lib.run(args)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty.*has no model\.json"):
        sft_lib.sft(tmp_path / "w", init_from=tmp_path / "empty")
    with pytest.raises(UserError, match=r"sft\.init_from is required"):
        sft_lib.sft(tmp_path / "w")
    assert not (tmp_path / "w").exists()
