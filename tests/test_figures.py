"""`warm-jax figures`: the registry, gin files and --help; three figures end to end on one toy
quickstart base (warm_lmc over two reward-model seeds, warp_slerp_lerp, warm_win_rate), checking
their numbers against the sub-runs they came from; the other figures' computations on
synthetic inputs."""

import json

import numpy as np
import pytest

from warm_jax import cli
from warm_jax import config as cfg
from warm_jax.experiments import figures as F

# A toy quickstart: a one-layer model, a few steps per stage, 2 reward models, short RL.
TOY = [
    "--gin.model_config.d_model=32",
    "--gin.model_config.n_layers=1",
    "--gin.model_config.head_dim=8",
    "--gin.model_config.d_ff=64",
    "--gin.model_config.max_len=64",
    "--gin.pretrain.num_documents=300",
    "--gin.pretrain.batch_size=8",
    "--gin.pretrain.seq_len=32",
    "--gin.pretrain/train.num_steps=4",
    "--gin.pretrain/train.checkpoint_every=4",
    "--gin.pretrain/train.eval_every=4",
    "--gin.sft.num_pairs=64",
    "--gin.sft.num_eval_pairs=8",
    "--gin.sft.seq_len=32",
    "--gin.sft.batch_size=8",
    "--gin.sft.keep_every=3",
    "--gin.sft.num_sample_prompts=4",
    "--gin.sft.max_new_tokens=8",
    "--gin.sft/train.num_steps=3",
    "--gin.sft/train.eval_every=3",
    "--gin.pair_data.num_train=32",
    "--gin.pair_data.num_validation=16",
    "--gin.pair_data.num_ood=16",
    "--gin.pair_data.max_len=48",
    "--gin.pair_data.responses='grammar'",  # no SFT sampling for the pairs
    "--gin.train_rms.num_members=2",
    "--gin.train_rms.num_steps=3",
    "--gin.train_rms.batch_size=8",
    "--gin.train_rms.probe_steps=3",
    "--gin.member_specs.learning_rates=(1e-3, 3e-3)",
    "--gin.eval_rm.num_lambdas=3",
    "--gin.eval_rm.subsets_per_m=1",
    "--gin.rl.num_prompts=32",
    "--gin.rl.num_eval_prompts=4",
    "--gin.rl.batch_size=8",
    "--gin.rl/rl_config.num_samples=2",
    "--gin.rl/rl_config.max_new_tokens=6",
    "--gin.rl/train.num_steps=2",
    "--gin.rl/train.checkpoint_every=1",
    "--gin.rl/train.eval_every=1",
    "--gin.warp/rl_config.num_samples=2",
    "--gin.warp/rl_config.max_new_tokens=6",
    "--gin.warp/rl_config.mu=0.5",
    "--gin.warp/train.num_steps=2",
    "--gin.warp/train.eval_every=1",
    "--gin.figures.progress=False",
]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """One toy base shared by the end-to-end tests (built by the first figure that runs)."""
    root = tmp_path_factory.mktemp("figures")
    return {"base": root / "base", "workdir": root / "figs"}


def _run(toy, name, *extra):
    args = [
        "figures", name,
        "--workdir", str(toy["workdir"]),
        f"--gin.figures.base='{toy['base']}'",
        *TOY, *extra,
    ]  # fmt: skip
    assert cli.main(args) == 0
    out = toy["workdir"] / name
    assert (out / f"{name}.png").stat().st_size > 1000
    return json.loads((out / f"{name}.json").read_text())


@pytest.fixture(autouse=True)
def _subcommand(monkeypatch):
    # The lead registers `figures` in warm_jax/cli.py; until then the test does.
    monkeypatch.setitem(cli.SUBCOMMANDS, "figures", ("warm_jax.experiments.figures", "figures"))


def test_every_figure_has_a_gin_file_and_a_help_line(capsys):
    assert set(F.REGISTRY) == {
        "warm_lmc", "warm_corruption", "warm_bon", "warm_rl", "warm_win_rate",
        "warp_anchor", "warp_slerp_lerp", "warp_liti", "warp_m", "warp_iterations",
    }  # fmt: skip
    for name, fig in F.REGISTRY.items():
        cfg.parse([f"figures/{name}"], [], extra_modules=("warm_jax.experiments.figures",))
        assert F.effective(fig.fn), name  # its knobs are bound by its gin file
        assert fig.what and fig.claim
    cfg.parse(["figures/warm_rl", "figures/paper_scale"], [], ("warm_jax.experiments.figures",))
    assert F.effective(F.warm_rl)["m_values"] == (1, 2, 6, 10)
    with pytest.raises(SystemExit):
        cli.main(["figures", "--help"])
    out = capsys.readouterr().out
    assert cli.main(["figures", "--list"]) == 0
    listed = capsys.readouterr().out
    for name in F.REGISTRY:
        assert name in out and name in listed


def test_bindings_are_restored():
    cfg.parse(["figures/warp_anchor"], [], ("warm_jax.experiments.figures",))
    import gin

    from warm_jax.policy import reinforce

    with gin.config_scope("warp"):
        before = reinforce.rl_config()
    binds = {"warp/rl_config.beta": 0.5, "warp/train.max_to_keep": None}
    with F.bindings(binds), gin.config_scope("warp"):
        assert reinforce.rl_config().beta == 0.5
        assert F.effective(F._train_fn())["max_to_keep"] is None
    with gin.config_scope("warp"):
        assert reinforce.rl_config() == before
        assert F.effective(F._train_fn())["max_to_keep"] == 3


def test_warm_lmc_end_to_end(toy):
    rec = _run(toy, "warm_lmc", "--gin.warm_lmc.seeds=(0, 1)")
    data = rec["data"]
    assert rec["seeds"] == [0, 1] and data["lambdas"] == [0.0, 0.5, 1.0]
    assert {"train", "train_clean", "train_corrupted", "validation"} <= set(data["subsets"])
    assert any(s.startswith("ood/") for s in data["subsets"])
    assert "train_rms.num_members" in rec["gin_config"]
    # Seed 0 is the base's reward models, seed 1 a new set trained with member_specs.seed=1.
    assert str(toy["base"] / "rm") in rec["sub_runs"]
    assert any(r.endswith("shared/rm/seed1") for r in rec["sub_runs"])
    for sub in data["subsets"]:
        c = data["curves"][sub]
        for s in ("0", "1"):
            members = data["per_seed"][s]["members"]
            names = data["per_seed"][s]["member_names"]
            for (a, b), wa, ens, diag in zip(
                data["per_seed"][s]["pairs"],
                c["wa_pairs"][s],
                c["ens_pairs"][s],
                c["diag_pairs"][s],
            ):
                # Every curve starts at member a's accuracy and ends at member b's.
                for curve in (wa, ens, diag):
                    assert curve[0] == pytest.approx(members[names[a]][sub])
                    assert curve[-1] == pytest.approx(members[names[b]][sub])
        seeds = np.asarray(c["wa_seeds"])
        np.testing.assert_allclose(c["wa_mean"], seeds.mean(0))
        np.testing.assert_allclose(c["wa_std"], seeds.std(0, ddof=1))
    base_eval = json.loads((toy["base"] / "rm/eval/results.json").read_text())
    assert (
        data["curves"]["validation"]["ens_pairs"]["0"]
        == (base_eval["lmc"]["curves"]["validation"]["ens"])
    )


def test_warp_slerp_lerp_end_to_end(toy):
    rec = _run(toy, "warp_slerp_lerp", "--gin.warp_slerp_lerp.lambdas=(0.0, 0.5, 1.0)")
    (c,) = rec["data"]["curves"].values()
    assert c["lambdas"] == [0.0, 0.5, 1.0]
    a, b = c["endpoints"]
    for key in ("reward", "control_reward", "kl_sft"):
        # λ = 0 and λ = 1 are the two policies themselves, for SLERP and LERP alike.
        for how in ("slerp", "lerp"):
            assert c[how][0][key] == pytest.approx(a[key], abs=1e-5)
            assert c[how][-1][key] == pytest.approx(b[key], abs=1e-5)
    runs = rec["data"]["runs"]
    assert runs[0].endswith("_s0_n2") and runs[1].endswith("_s1_n2")
    # The runs' own final evaluations (same evaluator) agree with the endpoints.
    final = json.loads(
        (toy["workdir"] / "shared/rl" / runs[0].split("/")[-1] / "rl.json").read_text()
    )
    assert final["final"]["reward"] == pytest.approx(a["reward"], abs=1e-4)
    assert final["final"]["kl_sft"] == pytest.approx(a["kl_sft"], abs=1e-4)


@pytest.mark.slow  # two more RL runs to compile: `make test-all`
def test_warm_win_rate_end_to_end(toy):
    rec = _run(
        toy,
        "warm_win_rate",
        "--gin.warm_rl.m_values=(1, 2)",
        "--gin.warm_win_rate.num_prompts=8",
        "--gin.warm_win_rate.samples=2",
    )
    data = rec["data"]
    assert data["m"] == 2 and data["steps"] == [1, 2]
    for pts in data["win_rates"].values():
        assert [p["step"] for p in pts] == [1, 2]
        for p in pts:
            assert 0.0 <= p["ci_low"] <= p["win_rate"] <= p["ci_high"] <= 1.0
            assert p["prompts"] == 8


# ----------------------------------------------------------------------------- pure helpers


def _fake_eval(rng, names, lam, subsets):
    members = {n: {s: float(rng.uniform(0.5, 0.9)) for s in subsets} for n in names}
    curves = {}
    for s in subsets:
        a, b = members[names[0]][s], members[names[1]][s]
        mid = [float(x) for x in rng.uniform(0.5, 0.9, len(lam) - 2)]
        curves[s] = {
            "wa": [[a, *mid, b]],
            "ens": [[a, *mid[::-1], b]],
            "diag": [[(1 - t) * a + t * b for t in lam]],
        }
    table = {
        s: {
            "ind": {"mean": float(np.mean([members[n][s] for n in names]))},
            "ens": float(rng.uniform(0.5, 0.9)),
            "warm": float(rng.uniform(0.5, 0.9)),
            "n": 10,
        }
        for s in subsets
    }
    vs_m = {
        "m": [1, 2],
        "curves": {s: {f"{k}_mean": list(rng.uniform(0, 1, 2)) for k in ("warm", "ens")}
                   for s in subsets},
    }  # fmt: skip
    return {
        "members": members,
        "lmc": {"lambdas": lam, "pairs": [[0, 1]], "curves": curves},
        "table": table,
        "accuracy_vs_m": vs_m,
    }


def test_lmc_and_corruption_summaries():
    rng = np.random.default_rng(0)
    lam = [0.0, 0.5, 1.0]
    subsets = ["train", "train_clean", "train_corrupted", "validation"]
    res = {s: _fake_eval(rng, ["m0", "m1"], lam, subsets) for s in (0, 3)}
    lmc = F.lmc_summary(res)
    c = lmc["curves"]["validation"]
    np.testing.assert_allclose(c["ens_mean"][0], np.mean([r["members"]["m0"]["validation"]
                                                         for r in res.values()]))  # fmt: skip
    assert (
        len(c["wa_std"]) == 3
        and c["diag_pairs"]["3"] == res[3]["lmc"]["curves"]["validation"]["diag"]
    )
    cor = F.corruption_summary(res)
    row = cor["table"]["train_corrupted"]
    assert row["warm"]["seeds"] == [r["table"]["train_corrupted"]["warm"] for r in res.values()]
    assert row["warm"]["mean"] == pytest.approx(np.mean(row["warm"]["seeds"]))
    assert cor["corrupted_vs_m"]["m"] == [1, 2]
    clean = {s: _fake_eval(rng, ["m0", "m1"], lam, ["train", "validation"]) for s in (0,)}
    with pytest.raises(Exception, match="clean labels"):
        F.corruption_summary(clean)


def test_bon_summary_gains():
    n = [1, 2, 4]
    by_seed = {}
    for s in (0, 1):
        curves = {}
        for name, slope in (("m0", 0.1), ("m1", 0.3), ("WARM M=2", 0.5 + s)):
            ctl = [0.2 + slope * i for i in range(3)]
            curves[name] = {"control": ctl, "control_gain": [c - ctl[0] for c in ctl]}
        by_seed[s] = {"n": n, "kl": [0.0, 0.19, 0.636], "curves": curves}
    out = F.bon_summary(by_seed, {"m0": "ind", "m1": "ind", "WARM M=2": "WARM M=2"})
    np.testing.assert_allclose(out["curves"]["ind"]["gain_mean"], [0.0, 0.2, 0.4])
    np.testing.assert_allclose(out["curves"]["WARM M=2"]["gain_mean"], [0.0, 1.0, 2.0])
    np.testing.assert_allclose(out["curves"]["WARM M=2"]["gain_over_ind_mean"], [0.0, 0.8, 1.6])
    assert out["curves"]["ind"]["gain_std"] == [0.0, 0.0, 0.0]


def test_curves_over_seeds_and_peak():
    t1 = {"step": [0, 5, 10], "kl_sft": [0, 1, 2], "reward": [0, 1, 2], "control_reward": [0, 2, 1]}
    t2 = {"step": [0, 5, 10], "kl_sft": [0, 1, 4], "reward": [0, 3, 2], "control_reward": [0, 4, 1]}
    c = F.curves_over_seeds([t1, t2])
    assert c["step"] == [0, 5, 10]
    np.testing.assert_allclose(c["control_reward_mean"], [0, 3, 1])
    np.testing.assert_allclose(c["kl_sft_std"], [0, 0, np.std([2, 4], ddof=1)])
    assert F.peak(c) == {"step": 5, "value": 3.0, "final": 1.0}


def test_win_rates_bounds():
    rng = np.random.default_rng(0)
    gold = {
        "a": {1: rng.normal(0.5, 1, (16, 3)), 2: rng.normal(1, 1, (16, 3))},
        "b": {1: rng.normal(0, 1, (16, 3)), 2: rng.normal(0, 1, (16, 3)), 3: np.zeros((16, 3))},
    }
    out = F.win_rates(gold, [("a", "b"), ("b", "a")])
    assert [p["step"] for p in out["a_vs_b"]] == [1, 2]
    for pts in out.values():
        for p in pts:
            assert 0.0 <= p["ci_low"] <= p["win_rate"] <= p["ci_high"] <= 1.0
    for p, q in zip(out["a_vs_b"], out["b_vs_a"]):
        assert p["win_rate"] + q["win_rate"] == pytest.approx(1.0)
