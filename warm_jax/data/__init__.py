"""Data layer: TFDS builders (array_record, no TensorFlow), tokenizers, grain pipelines.

Modules (import what you need; nothing heavy is imported here):
- `builders`: the builders by name ("hh_rlhf/helpful_base"), `prepare`, `read_split`, `load`.
- `hh_rlhf`, `qa_feedback`, `text_corpus`: the real-data builders; `oracle_builder`: the built-in
  synthetic task.
- `sources`: manual_dir first, else the public URL (see there for the exact policy).
- `splits`: the deterministic, seeded, grouped train/validation split.
- `tokenizer`, `gguf`: trained or loaded tokenizers.
- `encoding`: pair encoding (left-truncated prompt, whole response, `<eos>` last).
- `corruption`: seeded chosen/rejected swaps with a per-pair `corrupted` flag.
- `pipeline`: `lm_dataset`, `pair_dataset`, `make_iterator` (checkpointable iterator state).
- `commands`: `warm-jax data list|prepare`.

Real data lives outside the repository (../shared/data); point the builders at it with manual_dir:

    warm-jax data prepare --dataset hh_rlhf/helpful_base --manual_dir ../shared/data/hh_rlhf
    warm-jax data prepare --dataset qa_feedback/dev --manual_dir ../shared/data/finegrained_rlhf
    warm-jax data prepare --dataset text_corpus/tinyshakespeare \\
        --manual_dir ../shared/data/tinyshakespeare

or in Python `builders.load("hh_rlhf/helpful_base", "train", manual_dir="../shared/data/hh_rlhf")`.
A manual_dir may also be the shared root (../shared/data): each builder looks in its sub-folder.
"""
