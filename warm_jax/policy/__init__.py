"""Policy layer: sampling, and optimising a policy against any reward *function*.

- `sampling`: batched KV-cache sampling and teacher-forced log-probabilities.
- `objectives`: the maths (RLOO advantages, KL estimators, REINFORCE loss, entropy).
- `rewards`: the reward-function interface (reward model, WARM, ENS, Python control rewards
  through `jax.pure_callback`) and the tokenizer check. Never imports `warm_jax.reward`.
- `reinforce`: KL-regularised REINFORCE as one jitted step of the training loop (SFT or EMA
  anchor), and the Monte-Carlo evaluator (reward, control reward, KL to SFT).
- `warp`: WARP's iterations (M runs, SLERP of task vectors, LITI) and its Pareto front.
- `best_of_n`: the unbiased best-of-n estimator and the draw-and-score job.
"""
