"""Reward models: the Bradley–Terry loss, WARM members (sequential or vmapped), linear probing,
the weight average (WARM) and the prediction ensemble (ENS), and their evaluation.

Modules, bottom up:

- `losses`: `bradley_terry_loss`, `rewards`, `pair_rewards`, `ensemble_rewards`, `bt_loss_fn`.
- `probe`: linear probing of the scalar head on frozen features (shared by all members).
- `members`: per-member hyperparameters (seed / data order, lr and dropout grids, Baklava), the
  vmapped optimizer and loss, sequential and vmapped training on `warm_jax.training.loop`.
- `warm`: uniform weight average, best-M-of-K and greedy selection, checks that members merge.
- `data`: preference-pair splits (train / ID validation / OOD) for the oracle task and HH-RLHF.
- `evaluation`: accuracies of ind / ENS / WARM, interpolation curves, accuracy vs M, plots.

This package imports `models`, `merging`, `data` and `training`, never `policy`.
"""
