"""`train-rms` / `eval-rm` end to end on the oracle task with a tiny model: members on disk with
their settings, the WARM checkpoint, the evaluation outputs, and clean failures that leave the
workdir untouched (missing or damaged member, members of different models, empty split)."""

import json
import shutil

import chex
import gin
import jax
import numpy as np
import pytest

from warm_jax.data import oracle_task
from warm_jax.data.tokenizer import train_tokenizer
from warm_jax.errors import UserError
from warm_jax.experiments import pretrain as pretrain_lib
from warm_jax.experiments import reward_models as rm
from warm_jax.models import transformer as tm
from warm_jax.reward import data as rdata
from warm_jax.reward import warm as warm_lib
from warm_jax.training import checkpoints

TINY_MODEL = {
    "vocab_size": 192,
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "head_dim": 8,
    "d_ff": 64,
    "max_len": 64,
}


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    """A stand-in SFT workdir: model.json, tokenizer/, and kept checkpoints at steps 1 and 2
    (random weights: the tests check the plumbing, not the accuracy)."""
    wd = tmp_path_factory.mktemp("sft")
    tokenizer = train_tokenizer(oracle_task.sample_corpus(300, 0), 192, kind="word")
    config = pretrain_lib.sized_config(tm.TransformerConfig(**TINY_MODEL), tokenizer.vocab_size)
    for step in (1, 2):
        params = tm.init_params(config, jax.random.PRNGKey(step))
        checkpoints.save_params(wd / "checkpoints" / str(step), params, {"step": step})
    pretrain_lib.save_model_files(wd, config, tokenizer)
    return wd


def _bind(**extra):
    gin.clear_config()
    bindings = {
        "pair_data.num_train": 48,
        "pair_data.num_validation": 16,
        "pair_data.num_ood": 16,
        "pair_data.max_len": 48,
        "member_specs.learning_rates": (1e-3, 3e-3),
        "member_specs.dropout_rates": (0.0, 0.1),
        "rm/train.log_every": 1,
        **extra,
    }
    for k, v in bindings.items():
        gin.bind_parameter(k, v)


def _snapshot(path):
    return sorted((p.relative_to(path), p.stat().st_mtime_ns) for p in path.rglob("*"))


@pytest.fixture(scope="module")
def trained(sft_dir, tmp_path_factory):
    """Two members trained vmapped from two SFT checkpoints (Baklava), 25 % corrupted labels."""
    wd = tmp_path_factory.mktemp("warm")
    _bind(**{"pair_data.corruption": 0.25, "member_specs.init_steps": (1, 2)})
    summary = rm.train_rms(
        wd,
        init_from=sft_dir,
        num_members=2,
        mode="vmapped",
        num_steps=3,
        batch_size=8,
        probe_steps=50,
        eval_batch_size=16,
        progress=False,
    )
    gin.clear_config()
    return wd, summary


def test_train_rms_writes_members_probe_and_warm(trained, sft_dir):
    wd, summary = trained
    assert summary["probe"]["steps"] == 50 and 0 <= summary["probe"]["train_accuracy"] <= 1
    spec = json.loads((wd / rm.RM_FILE).read_text())
    assert spec["mode"] == "vmapped" and spec["data"]["corruption"] == 0.25
    assert spec["data_stats"]["train"]["corrupted"] == 12
    members = []
    for i in range(2):
        h = json.loads((rm.member_dir(wd, i) / rm.HPARAMS_FILE).read_text())
        assert h["complete"] and h["member"]["init_step"] == i + 1
        assert {"bt_loss", "accuracy"} <= set(h["train_metrics"])
        members.append(checkpoints.load_params(rm.member_dir(wd, i)))
    # Members start from different SFT checkpoints (Baklava) but share the probed head.
    head = checkpoints.load_params(wd / rm.PROBE_DIR)
    for m in members:
        assert not np.allclose(m["params"]["reward_head"]["kernel"], 0)
    assert head["kernel"].shape == (32, 1)
    # W/warm is the hand average of the members.
    warm = checkpoints.load_params(wd / rm.WARM_DIR)
    hand = jax.tree.map(lambda a, b: (np.asarray(a) + np.asarray(b)) / 2, *members)
    chex.assert_trees_all_close(jax.device_get(warm), hand, atol=1e-6)
    assert checkpoints.load_metadata(wd / rm.WARM_DIR)["members"] == ["m0", "m1"]


def test_eval_rm_reports_ind_ens_warm_curves_and_plots(trained):
    wd, _ = trained
    _bind(**{"eval_rm.num_lambdas": 3, "eval_rm.subsets_per_m": 1, "eval_rm.batch_size": 16})
    results = rm.eval_rm(wd)
    subsets = set(results["table"])
    assert {"train", "train_clean", "train_corrupted", "validation", "ood/drifted"} <= subsets
    assert results["sizes"]["train_corrupted"] == 12
    for row in results["table"].values():
        assert 0 <= row["warm"] <= 1 and 0 <= row["ens"] <= 1 and row["ind"]["n"] == 2
    # The curves' endpoints are the members; the ENS/WA curves have one point per λ.
    c = results["lmc"]["curves"]["validation"]
    assert results["lmc"]["pairs"] == [[0, 1]] and len(c["wa"][0]) == 3
    assert c["wa"][0][0] == results["members"]["m0"]["validation"]
    assert c["ens"][0][2] == results["members"]["m1"]["validation"]
    assert results["accuracy_vs_m"]["m"] == [1, 2]
    out = wd / rm.EVAL_DIR
    assert json.loads((out / "results.json").read_text())["selected"] == ["m0", "m1"]
    for png in ("lmc.png", "accuracy_vs_m.png"):
        assert (out / png).stat().st_size > 5000


def test_top_selection_by_a_split(trained):
    wd, _ = trained
    _bind(
        **{
            "warm_selection.select": "top",
            "warm_selection.num_select": 1,
            "warm_selection.select_split": "ood/hacked",
        }
    )
    config, _, params, _ = rm.load_members([rm.member_dir(wd, i) for i in range(2)])
    built = rdata.build_splits(
        rdata.PairDataConfig.from_dict(json.loads((wd / rm.RM_FILE).read_text())["data"]),
        pretrain_lib.load_model_files(wd)[1],
    )
    arrays = {k: rdata.to_arrays(v) for k, v in built.eval_splits().items()}
    chosen, record = rm.choose_members(params, config, arrays, rm.warm_selection())
    assert chosen == [int(np.argmax(record["scores"]))]
    assert len(record["scores"]) == 2


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_bad_members_stop_before_anything_is_written(trained, sft_dir, tmp_path):
    wd, _ = trained
    _bind()
    work = tmp_path / "w"
    shutil.copytree(wd, work)
    # A missing member.
    shutil.rmtree(rm.member_dir(work, 1))
    before = _snapshot(work)
    with pytest.raises(UserError, match=r"member checkpoint missing: .*m1"):
        rm.eval_rm(work)
    assert _snapshot(work) == before
    # A damaged member (the index of its weights gone).
    shutil.copytree(rm.member_dir(wd, 1), rm.member_dir(work, 1))
    for f in (rm.member_dir(work, 0) / "params").rglob("*"):
        if f.is_file() and "manifest" in f.name:
            f.unlink()
    before = _snapshot(work)
    with pytest.raises(UserError, match="m0"):
        rm.eval_rm(work)
    assert _snapshot(work) == before


def test_members_of_different_models_are_refused(trained, tmp_path):
    wd, _ = trained
    _bind()
    other = tmp_path / "other"
    shutil.copytree(rm.member_dir(wd, 1), other)
    h = json.loads((other / rm.HPARAMS_FILE).read_text())
    h["model"] = {**h["model"], "d_ff": 96}
    (other / rm.HPARAMS_FILE).write_text(json.dumps(h))
    before = _snapshot(wd)
    with pytest.raises(UserError, match=r"different architectures.*d_ff"):
        rm.eval_rm(wd, member_dirs=[str(rm.member_dir(wd, 0)), str(other)])
    h["model"]["d_ff"] = 64
    h["tokenizer"] = "another"
    (other / rm.HPARAMS_FILE).write_text(json.dumps(h))
    with pytest.raises(UserError, match="different vocabularies"):
        rm.eval_rm(wd, member_dirs=[str(rm.member_dir(wd, 0)), str(other)])
    assert _snapshot(wd) == before
    with pytest.raises(UserError, match="cannot merge"):
        warm_lib.check_mergeable([{"a": np.zeros(2)}, {"a": np.zeros(3)}], ["x", "y"])


def test_empty_split_and_bad_settings_are_clear_errors(sft_dir, tmp_path):
    _bind(**{"pair_data.num_ood": 0})
    with pytest.raises(UserError, match="'ood/drifted' is empty"):
        rm.train_rms(tmp_path / "w", init_from=sft_dir, num_members=2, progress=False)
    assert not (tmp_path / "w").exists()
    _bind()
    with pytest.raises(UserError, match="init_from is required"):
        rm.train_rms(tmp_path / "w", num_members=2)
    with pytest.raises(UserError, match="mode"):
        rm.train_rms(tmp_path / "w", init_from=sft_dir, mode="parallel")
    _bind(**{"member_specs.init_steps": (5,)})
    with pytest.raises(UserError, match="no checkpoint at step 5"):
        rm.train_rms(tmp_path / "w", init_from=sft_dir, num_members=2)
    assert not (tmp_path / "w").exists()


def test_one_module_serves_both_subcommands():
    import argparse

    train = argparse.ArgumentParser(prog="warm-jax train-rms")
    rm.add_arguments(train)
    args = train.parse_args(["--init_from", "sft", "--member", "1", "--member", "3"])
    assert args.rm_command == "train-rms" and args.member == [1, 3] and args.workdir == "runs/warm"
    evaluate = argparse.ArgumentParser(prog="warm-jax eval-rm")
    rm.add_arguments(evaluate)
    args = evaluate.parse_args(["--workdir", "w", "--member_dir", "a", "--member_dir", "b"])
    assert args.rm_command == "eval-rm" and args.member_dir == ["a", "b"]


def test_the_saved_gin_config_reparses_to_the_same_experiment(trained):
    wd, _ = trained
    rm._parse_gin([str(wd / "operative_config.gin")], [])
    data = json.loads((wd / rm.RM_FILE).read_text())["data"]
    assert rdata.pair_data().to_dict() == data
    gin.clear_config()


def test_policy_responses_are_sampled_once_labelled_by_gold_and_reused(
    sft_dir, tmp_path, monkeypatch
):
    """pair_data.responses='policy': the pairs' responses are the SFT policy's samples (cached in
    the workdir), labelled by the gold reward; evaluation reuses the cache without the policy."""
    _bind(**{"pair_data.responses": "policy", "pair_data.num_train": 16})
    wd = tmp_path / "w"
    rm.train_rms(
        wd,
        init_from=sft_dir,
        num_members=1,
        num_steps=1,
        batch_size=8,
        probe_steps=0,
        eval_batch_size=16,
        progress=False,
    )
    cache = json.loads((wd / rm.POLICY_RESPONSES_FILE).read_text())
    cfg = rdata.pair_data()
    base = cfg.seed + rdata._PREFS_SEED_OFFSET
    # Train (two seeds) and validation (two seeds): one response per prompt each.
    assert sorted(map(int, cache)) == sorted(
        [
            base,
            base + 1,
            base + rdata._VALIDATION_SEED_OFFSET,
            base + rdata._VALIDATION_SEED_OFFSET + 1,
        ]
    )
    assert len(cache[str(base)]) == 16
    records = rdata.split_records(cfg, lambda prompts, seed: cache[str(seed)])["train"]
    prompts = oracle_task.sample_prompts(16, base)
    for i, r in enumerate(records):
        assert r["prompt"] == prompts[i]
        assert {r["chosen"], r["rejected"]} == {cache[str(base)][i], cache[str(base + 1)][i]}
        gold = oracle_task.gold_rewards([r["prompt"]] * 2, [r["chosen"], r["rejected"]])
        np.testing.assert_allclose([r["gold_chosen"], r["gold_rejected"]], gold, rtol=1e-6)
    # Random weights talk nonsense, unlike the grammar's SFT distribution.
    assert cache[str(base)] != oracle_task.sample_responses(prompts, base)

    def no_policy(*a, **k):
        raise AssertionError("the cached responses should have been used")

    monkeypatch.setattr(rm.sft_lib, "load_model", no_policy)
    _, tokenizer = pretrain_lib.load_model_files(wd)
    splits, _ = rm.build_splits(wd, cfg, tokenizer, str(sft_dir))
    assert len(splits.train) == 16
    gin.clear_config()
    with pytest.raises(UserError, match="oracle task"):
        rdata.PairDataConfig(task="hh_rlhf", responses="policy")
    with pytest.raises(UserError, match="responses"):
        rdata.PairDataConfig(responses="human")
