"""`warm-jax quickstart` end to end at toy scale, from a relative workdir, then cached."""

import json

from warm_jax import cli

TOY = [
    "--gin.pretrain.num_documents=300",
    "--gin.pretrain.batch_size=8",
    "--gin.pretrain.seq_len=32",
    "--gin.model_config.d_model=32",
    "--gin.model_config.n_layers=1",
    "--gin.model_config.head_dim=8",
    "--gin.model_config.d_ff=64",
    "--gin.pretrain/train.num_steps=6",
    "--gin.pretrain/train.checkpoint_every=3",
    "--gin.pretrain/train.eval_every=3",
    "--gin.pretrain/train.progress=False",
    "--gin.quickstart.num_prompts=8",
    "--gin.quickstart.max_new_tokens=8",
]


def test_quickstart_runs_then_skips_finished_stages(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["quickstart", "--workdir", "runs/qs", *TOY]) == 0
    summary = json.loads((tmp_path / "runs/qs/summary.json").read_text())
    assert summary["pretrain"]["steps"] == 6
    assert summary["pretrain"]["validation_loss"] > 0
    assert len(summary["samples"]["examples"]) == 8
    assert -4.5 <= summary["samples"]["gold_reward_mean"] <= 1.0
    assert (tmp_path / "runs/qs/pretrain/loss.png").exists()
    assert (tmp_path / "runs/qs/operative_config.gin").exists()
    capsys.readouterr()
    assert cli.main(["quickstart", "--workdir", "runs/qs", *TOY]) == 0
    assert "pretrain: complete" in capsys.readouterr().out
