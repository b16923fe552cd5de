"""Promise 3: corrupt inputs are detected, never used. A bit flip or truncation in a checkpoint's
data files, a checkpoint whose tree does not match the model, a merge input of another
architecture: each is a clear error naming the file or directory. With
`train.on_corrupt_checkpoint='fallback'` a run whose latest checkpoint is damaged resumes from the
newest intact one instead, with a warning naming the step it skipped."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from warm_jax import merging_checkpoints as mc
from warm_jax.errors import UserError
from warm_jax.models import transformer as tm
from warm_jax.training import checkpoints as ck

from . import common, tiny_train

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def random_tree(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "embed": rng.standard_normal((40, 24)).astype(np.float32),
            "block_0": {"w": rng.standard_normal((24, 24)).astype(np.float32)},
            "norm": rng.standard_normal((24,)).astype(np.float32).astype(jax.numpy.bfloat16),
            "count": np.arange(5, dtype=np.int32),
        }
    }


def test_flipped_bits_in_any_data_file_are_detected_never_loaded(tmp_path):
    """Orbax keeps no checksum of array data (compressed or not): without the fingerprints most flips
    load as silently different weights. Every flip must now either raise an error naming the
    checkpoint or leave the values bit-identical (a flip in bytes nothing reads: OCDBT keeps
    superseded index nodes around)."""
    path = ck.save_params(tmp_path / "m", random_tree(), {"model": "x"})
    want = random_tree()
    rng = random.Random(0)
    files = common.array_data_files(path / ck.PARAMS_ITEM)
    biggest = max(files, key=lambda p: p.stat().st_size)  # the one holding the array chunks
    detected = dict.fromkeys(files, 0)
    flips = 12
    for f in files:
        original = f.read_bytes()
        for offset in rng.sample(range(len(original)), min(flips, len(original))):
            common.flip_byte(f, offset, mask=1 << rng.randrange(8))
            try:
                got = common.host(ck.load_params(path))
            except UserError as e:
                assert str(path / ck.PARAMS_ITEM) in str(e)
                detected[f] += 1
            else:
                common.assert_trees_bitwise_equal(got, want)
            f.write_bytes(original)
    assert detected[biggest] >= flips - 2, detected


def test_truncated_data_files_are_clear_errors_naming_the_checkpoint(tmp_path):
    """A copy or download cut short: an error naming the checkpoint, or (for the OCDBT files and
    tail bytes no read touches) the very same values; never other values."""
    path = ck.save_params(tmp_path / "m", random_tree(), {"model": "x"})
    files = common.array_data_files(path / ck.PARAMS_ITEM)
    errors = {}
    for f in files:
        original = f.read_bytes()
        for keep in (0, len(original) // 2, len(original) - 1):
            f.write_bytes(original[:keep])
            try:
                common.assert_trees_bitwise_equal(ck.load_params(path), random_tree())
            except ck.CorruptCheckpointError as e:
                assert str(path / ck.PARAMS_ITEM) in str(e)
                errors[(f, keep)] = e
        f.write_bytes(original)
    biggest = max(files, key=lambda p: p.stat().st_size)
    assert (biggest, 0) in errors and (biggest, biggest.stat().st_size // 2) in errors
    common.assert_trees_bitwise_equal(ck.load_params(path), random_tree())


def test_damaged_metadata_and_fingerprint_files_are_clear_errors(tmp_path):
    path = ck.save_params(tmp_path / "m", random_tree(), {"model": "x"})
    fps = path / ck.PARAMS_ITEM / ck.FINGERPRINTS_FILE
    fps.write_text(fps.read_text()[:20])
    with pytest.raises(ck.CorruptCheckpointError, match=f"corrupt fingerprint file {fps}"):
        ck.load_params(path)
    fps.unlink()
    meta = path / ck.PARAMS_ITEM / "_METADATA"
    meta.write_bytes(b"\x00garbage")
    # The shapes come from our own record, so the damage shows when the arrays are read...
    with pytest.raises(ck.CorruptCheckpointError, match="cannot restore parameters from"):
        ck.load_params(path)
    # ...or, without that record (as earlier versions wrote), already in the shapes.
    (path / ck.PARAMS_ITEM / ck.SHAPES_FILE).unlink()
    with pytest.raises(ck.CorruptCheckpointError, match="unreadable checkpoint metadata in"):
        ck.params_shapes(path)
    (path / ck.META_FILE).write_text("{not json")
    with pytest.raises(UserError, match=f"corrupt metadata file {path / ck.META_FILE}"):
        ck.load_metadata(path)


# ----------------------------------------------------------------- training checkpoints


def flip_every_data_file(tree_dir: Path) -> None:
    """One flipped bit in each data file: which of them hold the live chunks depends on how
    Orbax laid the tree out (per-process files, or merged into the top-level `d/`)."""
    for f in common.array_data_files(tree_dir):
        common.flip_byte(f)


def test_damaged_latest_checkpoint_is_an_error_then_a_fallback_when_asked(tmp_path, reference):
    run = tmp_path / "run"
    shutil.copytree(reference["workdir"], run)
    n = reference["num_steps"]
    step_dir = run / ck.CHECKPOINTS_DIR / str(n)
    flip_every_data_file(step_dir / ck.PARAMS_ITEM)
    with pytest.raises(ck.CorruptCheckpointError, match=str(step_dir)):
        ck.load_params(run)

    # By default the run refuses, names the step, and says how to fall back.
    with pytest.raises(
        ck.CorruptCheckpointError,
        match=rf"{step_dir}.*on_corrupt_checkpoint='fallback' to resume from it",
    ) as err:
        tiny_train.run(run, n, 4, record=False)
    assert "step 4" in str(err.value)
    assert common.finished_steps(run)[-2:] == [4, n]
    assert not (run / "corrupt_checkpoints").exists()

    # With the switch: a warning naming the skipped step, the damaged step moved aside, and a
    # resume from step 4 that ends exactly where the undamaged run ended.
    with pytest.warns(RuntimeWarning, match=rf"checkpoint step {n} is unreadable.*step 4"):
        result = tiny_train.run(run, n, 4, record=False, on_corrupt_checkpoint="fallback")
    assert result.resumed_from == 4
    common.assert_trees_bitwise_equal(result.params, reference["params"])
    common.assert_trees_bitwise_equal(ck.load_params(run), reference["params"])
    assert [p.name.split("-")[0] for p in (run / "corrupt_checkpoints").iterdir()] == [str(n)]
    assert common.loss_history(run) == common.loss_history(reference["workdir"])


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["optimizer-state", "data-position", "truncated-params"])
def test_other_damage_to_the_latest_step_falls_back_too(tmp_path, reference, damage):
    run = tmp_path / "run"
    shutil.copytree(reference["workdir"], run)
    n = reference["num_steps"]
    step_dir = run / ck.CHECKPOINTS_DIR / str(n)
    if damage == "optimizer-state":
        flip_every_data_file(step_dir / "train")
    elif damage == "data-position":
        (step_dir / "data" / "metadata").write_text('{"served": ')
    else:
        for f in common.array_data_files(step_dir / ck.PARAMS_ITEM):
            f.write_bytes(f.read_bytes()[:7])
    with pytest.raises(ck.CorruptCheckpointError, match=str(step_dir)):
        tiny_train.run(run, n, 4, record=False)
    with pytest.warns(RuntimeWarning, match=f"checkpoint step {n} is unreadable"):
        result = tiny_train.run(run, n, 4, record=False, on_corrupt_checkpoint="fallback")
    assert result.resumed_from == 4
    common.assert_trees_bitwise_equal(result.params, reference["params"])


def test_checkpoint_of_another_model_is_refused_even_with_fallback(tmp_path, reference):
    """A tree mismatch is not damage: falling back would only find more of the other model."""
    from helpers import TINY

    run = tmp_path / "run"
    shutil.copytree(reference["workdir"], run)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    other = tm.TransformerConfig(**{**TINY.to_dict(), "n_layers": 3})
    with pytest.raises(UserError, match=r"unexpected|missing") as err:
        tiny_train.run(
            run,
            reference["num_steps"],
            4,
            record=False,
            on_corrupt_checkpoint="fallback",
            config=other,
        )
    assert not isinstance(err.value, ck.CorruptCheckpointError)
    assert "block_2" in str(err.value) and str(run) in str(err.value)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_bad_on_corrupt_setting_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="on_corrupt_checkpoint='skip'"):
        tiny_train.run(tmp_path, 1, 1, record=False, on_corrupt_checkpoint="skip")


# ------------------------------------------------------------------------------------ merges


def _model_params(config) -> dict:
    shapes = jax.eval_shape(lambda: tm.init_params(config, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(config.n_layers)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)


def test_merge_member_of_another_architecture_names_it(tmp_path):
    from helpers import TINY

    a = ck.save_params(tmp_path / "a", _model_params(TINY))
    b = ck.save_params(tmp_path / "b", _model_params(TINY))
    deeper = tm.TransformerConfig(**{**TINY.to_dict(), "n_layers": 3})
    c = ck.save_params(tmp_path / "deeper", _model_params(deeper))
    wider = tm.TransformerConfig(**{**TINY.to_dict(), "d_ff": 96})
    d = ck.save_params(tmp_path / "wider", _model_params(wider))
    for other, what in ((c, "block_2"), (d, r"has shape \(96, 32\)")):
        with pytest.raises(UserError, match=rf"input 3 \({other}\).*{what}|{what}.*input 3"):
            mc.merge_checkpoints("average", [a, b, other], tmp_path / "out", progress=False)
        with pytest.raises(UserError, match=str(other)):
            mc.merge_checkpoints("slerp", [a, other], tmp_path / "out", base=b, progress=False)
    assert not (tmp_path / "out").exists()


def test_merge_input_with_a_flipped_bit_is_refused_before_any_output(tmp_path):
    def floats(seed):
        tree = random_tree(seed)
        del tree["params"]["count"]  # merges take floating-point parameters only
        return tree

    a = ck.save_params(tmp_path / "a", floats(1))
    b = ck.save_params(tmp_path / "b", floats(2))
    # The chunk file of a params checkpoint only: the index stays readable, so the damage is
    # met while the merge reads the arrays (where the fingerprints catch it).
    chunks = common.array_data_files(b / ck.PARAMS_ITEM / "ocdbt.process_0")
    common.flip_byte(max(chunks, key=lambda p: p.stat().st_size))
    with pytest.raises(UserError, match=rf"input 2 \({b}\).*(fingerprint|cannot read)"):
        mc.merge_checkpoints("average", [a, b], tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
