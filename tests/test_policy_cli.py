"""`warm-jax rl`, `warp` and `bon` end to end on a tiny oracle-task model: outputs written,
control reward logged every step, the LITI front starting at KL 0, WARM/ENS of identical reward
models equal to the single one, and clean errors before anything runs."""

import json

import jax
import numpy as np
import pytest

from warm_jax import cli
from warm_jax.data import oracle_task
from warm_jax.data.tokenizer import train_tokenizer
from warm_jax.experiments import pretrain as pretrain_lib
from warm_jax.models import transformer as tm
from warm_jax.training import checkpoints
from warm_jax.training.metrics import read_jsonl

# One layer: the programs (sampling loop, three teacher-forced passes, a backward pass) compile
# twice as fast, and nothing here depends on depth.
MODEL = tm.TransformerConfig(
    vocab_size=192, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
    max_len=64,
)  # fmt: skip
# The same sampling settings and rewards for `rl` and `warp`: their evaluators are one compiled
# program. (Training steps that log a Python control reward hold a host callback, which keeps
# them out of the persistent compilation cache: each run compiles its own.)
COMMON = [
    "--gin.rl_config.beta=0.1",
    "--gin.rl_config.mu=0.5",
    "--gin.rl_config.num_samples=2",
    "--gin.rl_config.max_new_tokens=6",
]


def _model_dir(path, tokenizer, params):
    checkpoints.save_params(path, params)  # first: it replaces the directory
    pretrain_lib.save_model_files(path, MODEL, tokenizer)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("policy_cli")
    tok = train_tokenizer(oracle_task.sample_corpus(300, 0), MODEL.vocab_size, kind="word")
    params = tm.init_params(MODEL, jax.random.PRNGKey(0))
    rm = jax.tree.map(np.asarray, params)
    # A reward model = any backbone + a random scalar head.
    rm["params"]["reward_head"]["kernel"] = np.asarray(
        jax.random.normal(jax.random.PRNGKey(1), rm["params"]["reward_head"]["kernel"].shape)
    )
    other_tok = train_tokenizer(oracle_task.sample_corpus(300, 1)[:30], 192, kind="word")
    return {
        "root": root,
        "sft": _model_dir(root / "sft", tok, params),
        "rm": _model_dir(root / "rm", tok, rm),
        "bad_rm": _model_dir(root / "bad_rm", other_tok, rm),
    }


@pytest.fixture(autouse=True)
def _subcommands(monkeypatch):
    # The lead registers these in warm_jax/cli.py; until then (and after) the test does too.
    for name in ("bon", "rl", "warp"):
        monkeypatch.setitem(cli.SUBCOMMANDS, name, ("warm_jax.experiments.rl", name))


def _rl_args(dirs, workdir, *extra):
    return [
        "rl",
        "--init_from", str(dirs["sft"]),
        "--workdir", str(workdir),
        "--reward", str(dirs["rm"]),
        "--gin.rl/train.num_steps=2",
        "--gin.rl.batch_size=8",
        "--gin.rl.num_prompts=32",
        "--gin.rl.num_eval_prompts=4",
        "--gin.rl.progress=False",
        "--gin.rl_config.anchor='sft'",
        "--gin.rl_config.baseline='value'",
        *COMMON,
        *extra,
    ]  # fmt: skip


def test_rl_warp_and_bon_end_to_end(dirs, capsys):
    root = dirs["root"]
    assert cli.main(_rl_args(dirs, root / "rl")) == 0
    summary = json.loads((root / "rl" / "rl.json").read_text())
    assert summary["control"] == "gold" and summary["steps"] == 2
    for when in ("initial", "final"):
        assert {"reward", "control_reward", "kl_sft", "response_length"} <= set(summary[when])
    assert summary["initial"]["kl_sft"] == 0.0
    rows = [r for r in read_jsonl(root / "rl" / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2 and all("control_reward" in r and "kl_anchor" in r for r in rows)
    assert rows[-1]["kl_anchor"] == rows[-1]["kl_sft"]  # the SFT anchor
    assert all("value_loss" in r for r in rows)  # the learned value baseline
    assert (root / "rl" / "rl.png").stat().st_size > 1000

    warp_args = [
        "warp",
        "--init_from", str(dirs["sft"]),
        "--workdir", str(root / "warp"),
        "--reward", str(dirs["rm"]),
        "--gin.warp/train.num_steps=2",
        "--gin.warp.batch_size=8",
        "--gin.warp.num_prompts=32",
        "--gin.warp.num_eval_prompts=4",
        "--gin.warp.progress=False",
        "--gin.warp_config.num_iterations=1",
        "--gin.warp_config.front_etas=(0.0, 1.0)",
        f"--gin.warp.compare_with=['{root / 'rl'}']",
        *COMMON,
    ]  # fmt: skip
    assert cli.main(warp_args) == 0
    warp = json.loads((root / "warp" / "warp.json").read_text())
    (it,) = warp["iterations"]
    assert [p["eta"] for p in it["front"]] == [0.0, 1.0]
    assert it["front"][0]["kl_sft"] == 0.0  # η = 0 is the SFT policy itself
    assert it["front"][1]["reward"] == pytest.approx(it["slerp_eval"]["reward"], abs=1e-5)
    assert "rl" in warp["compare"] and len(it["trajectories"]) == 2
    for name in ("slerp", "liti", "run0", "run1"):
        assert (root / "warp" / "iter1" / name).is_dir()
    assert (root / "warp" / "pareto.png").stat().st_size > 1000

    rm = str(dirs["rm"])
    bon_args = [
        "bon",
        "--init_from", str(dirs["sft"]),
        "--workdir", str(root / "bon"),
        "--reward", rm, "--reward", f"ens:{rm},{rm}", "--reward", f"warm:{rm},{rm}",
        "--gin.bon.n_max=4",
        "--gin.bon.num_prompts=4",
        "--gin.bon.max_new_tokens=6",
    ]  # fmt: skip
    assert cli.main(bon_args) == 0
    bon = json.loads((root / "bon" / "bon.json").read_text())
    assert bon["n"] == [1, 2, 4]
    curves = bon["curves"]
    assert set(curves) == {"rm", "ENS M=2", "WARM M=2"}
    # ENS and WARM of two copies of one reward model select exactly as that model does.
    for name in ("ENS M=2", "WARM M=2"):
        np.testing.assert_allclose(curves[name]["control"], curves["rm"]["control"], atol=1e-6)
    assert (root / "bon" / "bon.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "final" in out and "iter 1 slerp" in out and "control reward" in out


def test_mismatched_reward_tokenizer_stops_before_anything_runs(dirs, capsys):
    workdir = dirs["root"] / "never"
    args = _rl_args(dirs, workdir)
    args[args.index("--reward") + 1] = str(dirs["bad_rm"])
    assert cli.main(args) == 2
    assert "tokenizer" in capsys.readouterr().err
    assert not workdir.exists()


@pytest.mark.parametrize(
    "binding, match",
    [
        ("--gin.rl_config.beta=-1.0", "beta"),
        ("--gin.rl_config.mu=0.0", "mu"),
        ("--gin.warp_config.eta=1.5", "allow_extrapolation"),
    ],
)
def test_bad_settings_stop_before_anything_runs(dirs, capsys, binding, match):
    workdir = dirs["root"] / "never"
    cmd = "warp" if "warp_config" in binding else "rl"
    args = [cmd, "--init_from", str(dirs["sft"]), "--workdir", str(workdir), binding]
    assert cli.main(args) == 2
    assert match in capsys.readouterr().err
    assert not workdir.exists()
