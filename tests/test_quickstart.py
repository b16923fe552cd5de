"""`warm-jax quickstart` end to end at toy scale, from a relative workdir, then cached."""

import json

import numpy as np

from warm_jax import cli
from warm_jax.experiments import quickstart as qs

TOY = [
    "--gin.pretrain.num_documents=300",
    "--gin.pretrain.batch_size=8",
    "--gin.pretrain.seq_len=32",
    "--gin.model_config.d_model=32",
    "--gin.model_config.n_layers=1",
    "--gin.model_config.head_dim=8",
    "--gin.model_config.d_ff=64",
    "--gin.pretrain/train.num_steps=4",
    "--gin.pretrain/train.checkpoint_every=2",
    "--gin.pretrain/train.eval_every=2",
    "--gin.quickstart.progress=False",
    "--gin.sft.num_pairs=64",
    "--gin.sft.num_eval_pairs=8",
    "--gin.sft.batch_size=8",
    "--gin.sft.num_sample_prompts=4",
    "--gin.sft.max_new_tokens=8",
    "--gin.sft.keep_every=2",
    "--gin.sft/train.num_steps=2",
    "--gin.sft/train.eval_every=2",
    "--gin.train_rms.num_members=2",
    "--gin.train_rms.num_steps=2",
    "--gin.train_rms.batch_size=8",
    "--gin.train_rms.probe_steps=5",
    "--gin.train_rms.eval_batch_size=16",
    "--gin.pair_data.num_train=32",
    "--gin.pair_data.num_validation=8",
    "--gin.pair_data.num_ood=8",
    "--gin.eval_rm.num_lambdas=3",
    "--gin.eval_rm.subsets_per_m=1",
    "--gin.eval_rm.batch_size=16",
    "--gin.bon.num_prompts=4",
    "--gin.bon.n_max=2",
    "--gin.bon.max_new_tokens=8",
    "--gin.rl.num_prompts=16",
    "--gin.rl.batch_size=8",
    "--gin.rl.num_eval_prompts=4",
    "--gin.rl/rl_config.max_new_tokens=8",
    "--gin.rl/rl_config.num_samples=2",
    "--gin.rl/train.num_steps=2",
    "--gin.rl/train.eval_every=1",
    "--gin.rl/train.checkpoint_every=1",
    "--gin.quickstart.win_rate_prompts=6",
    "--gin.quickstart.win_rate_samples=2",
    "--gin.warp.num_prompts=16",
    "--gin.warp.batch_size=8",
    "--gin.warp.num_eval_prompts=4",
    "--gin.warp/rl_config.max_new_tokens=8",
    "--gin.warp/rl_config.num_samples=2",
    "--gin.warp/train.num_steps=2",
    "--gin.warp/train.eval_every=1",
    "--gin.warp/train.checkpoint_every=1",
    "--gin.warp_config.front_etas=(0.0, 1.0)",
]


def test_quickstart_runs_every_stage_then_skips_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["quickstart", "--workdir", "runs/qs", *TOY]) == 0
    out = capsys.readouterr().out
    root = tmp_path / "runs/qs"
    s = json.loads((root / "summary.json").read_text())
    assert set(s["seconds"]) == set(qs.STAGES) == set(s["cpu_seconds"])
    assert all(v > 0 for v in s["cpu_seconds"].values())
    assert s["pretrain"]["validation_loss"] > 0
    # Reward models: 8 validation pairs, accuracies are fractions of them.
    for split, row in s["reward_models"].items():
        assert 0 <= row["warm"] <= 1 and 0 <= row["ens"] <= 1, split
    assert s["reward_models"]["validation"]["n"] == 8
    assert set(s["bon"]["control"]) == {"m0", "ENS M=2", "warm"}
    assert s["bon"]["n"] == [1, 2]
    # RL: the held-out evaluation at every step, the summary's numbers are the runs' own.
    for key in ("rl_single", "rl_warm"):
        rl = json.loads((root / key / "rl.json").read_text())
        assert s[key]["final"]["control_reward"] == rl["final"]["control_reward"]
        assert s[key]["eval_steps"] == [0, 1, 2]
    assert s["rl_single"]["reward"] == "m0" and s["rl_warm"]["reward"] == "warm"
    # Win rates: 6 prompts x 2 samples, gold-judged, with an interval around the value.
    win = json.loads((root / "win_rate.json").read_text())
    for k in ("warm_vs_single", "warm_vs_sft", "single_vs_sft"):
        w = win[k]
        assert w["prompts"] == 6 and w["ci_low"] <= w["win_rate"] <= w["ci_high"]
    ex = win["examples"][0]
    assert set(ex) == {"prompt", "rl_warm", "rl_single", "sft"}
    assert np.isfinite(ex["sft"]["gold"]) and "sentiment" in ex["sft"]
    # WARP: 2 iterations, each with a front over the two etas.
    assert [it["iteration"] for it in s["warp"]["iterations"]] == [1, 2]
    assert [p["eta"] for p in s["warp"]["iterations"][0]["front"]] == [0.0, 1.0]
    for f in (
        "summary.png",
        "operative_config.gin",
        "quickstart_config.gin",
        "bon/bon.png",
        "warp/pareto.png",
        "rm/eval/lmc.png",
    ):
        assert (root / f).stat().st_size > 0, f
    assert "win rate" in out and "gold" in out
    # A rerun skips every stage and rewrites the same numbers.
    assert cli.main(["quickstart", "--workdir", "runs/qs", *TOY]) == 0
    out = capsys.readouterr().out
    assert out.count("complete, skipped") == len(qs.STAGES)
    again = json.loads((root / "summary.json").read_text())
    assert again["win_rate"] == s["win_rate"] and again["reward_models"] == s["reward_models"]


def test_seed_flag_binds_every_training_seed_and_gin_overrides_win(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    only_pretrain = "--gin.quickstart.stages=('pretrain',)"
    losses = {}
    for name, extra in (("s0", []), ("s3", ["--seed", "3", "--gin.member_specs.seed=5"])):
        assert cli.main(["quickstart", "--workdir", name, *TOY, only_pretrain, *extra]) == 0
        config = (tmp_path / name / "quickstart_config.gin").read_text()
        rows = [json.loads(x) for x in (tmp_path / name / "pretrain/metrics.jsonl").open()]
        losses[name] = [r["loss"] for r in rows if "loss" in r]
        if name == "s3":
            for binding in qs.SEED_BINDINGS:
                want = 5 if binding == "member_specs.seed" else 3
                assert f"{binding} = {want}" in config, binding
    # Another initialisation and data order: the training curve is not the seed-0 one.
    assert len(losses["s0"]) == len(losses["s3"]) > 0
    assert losses["s0"] != losses["s3"]
