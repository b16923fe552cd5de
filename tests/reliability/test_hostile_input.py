"""Promise 5: hostile input. Property tests over the dataset parsers, the tokenizer loaders, the
command line's gin flags and the merge inputs: every input either works or ends in the project's
own clear error (UserError), never a raw traceback from deep inside a library, never a hang."""

from __future__ import annotations

import contextlib
import gzip
import json
import signal
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from warm_jax.errors import UserError

FAST = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FEW = settings(FAST, max_examples=15)


@contextlib.contextmanager
def no_hang(seconds: int = 20):
    """Fails the example instead of letting the suite hang (the tests run on the main thread)."""

    def expire(*_):
        raise TimeoutError(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def works_or_user_error(fn, *args, **kwargs):
    """Runs fn; returns its result, or the UserError it raised. Anything else fails the test."""
    with no_hang():
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            assert str(e).strip(), "a UserError with no message"
            return e


def fresh_dir(root: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=root))


# JSON values of any shape, including the awkward ones (NaN, huge ints, lone surrogates).
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)
dialogue_text = st.lists(
    st.sampled_from(["\n\nHuman:", "\n\nAssistant:", " hi", " there", "\n", "", "Assistant:"])
    | st.text(max_size=8),
    max_size=8,
).map("".join)


# --------------------------------------------------------------------------------- HH-RLHF


@FAST
@given(chosen=dialogue_text, rejected=dialogue_text)
def test_hh_split_dialogue_splits_or_gives_a_reason(chosen, rejected):
    from warm_jax.data import hh_rlhf

    out = hh_rlhf.split_dialogue(chosen, rejected)
    if isinstance(out, str):
        assert out in hh_rlhf.DROP_REASONS
    else:
        prompt, a, b = out
        assert prompt + a == chosen and prompt + b == rejected
        assert prompt.endswith(hh_rlhf.ASSISTANT)


hh_lines = st.lists(
    st.fixed_dictionaries({"chosen": dialogue_text, "rejected": dialogue_text})
    | st.dictionaries(st.sampled_from(["chosen", "rejected", "x"]), json_values, max_size=3)
    | json_values,
    max_size=6,
)


@FAST
@given(
    lines=hh_lines,
    raw_tail=st.binary(max_size=40),
    gz=st.booleans(),
    cut=st.none() | st.integers(0, 200),
)
def test_hh_parse_file_on_any_bytes(tmp_path, lines, raw_tail, gz, cut):
    from warm_jax.data import hh_rlhf

    body = "".join(json.dumps(x) + "\n" for x in lines).encode() + raw_tail
    if gz:
        body = gzip.compress(body)
    if cut is not None:  # a truncated download
        body = body[:cut]
    path = fresh_dir(tmp_path) / ("test.jsonl.gz" if gz else "test.jsonl")
    path.write_bytes(body)
    out = works_or_user_error(hh_rlhf.parse_file, path, "helpful_base")
    if isinstance(out, UserError):
        assert str(path) in str(out)
    else:
        assert out.raw == len(out.examples) + sum(out.dropped.values())


# --------------------------------------------------------------------------- QA-Feedback


def qa_record_like():
    """Records that are often almost right, so the checks past the first one get exercised."""
    good = {
        "question": st.text(max_size=10),
        "passages": st.lists(st.lists(st.text(max_size=8), min_size=1, max_size=3), max_size=2),
        "preference": st.lists(st.sampled_from([0, 1, 2]), min_size=6, max_size=6),
        **{f"prediction {k}": st.text(max_size=8) for k in range(1, 5)},
    }
    return st.fixed_dictionaries(good) | st.fixed_dictionaries(
        {k: v | json_values for k, v in good.items()}
    )


@FAST
@given(records=st.lists(qa_record_like() | json_values, max_size=4), junk=st.binary(max_size=20))
def test_qa_feedback_parse_file_on_any_json(tmp_path, records, junk):
    from warm_jax.data import qa_feedback

    path = fresh_dir(tmp_path) / "dev.json"
    path.write_bytes(json.dumps(records).encode() + junk)
    out = works_or_user_error(qa_feedback.parse_file, path)
    if isinstance(out, UserError):
        assert str(path) in str(out)
    else:
        assert out.records == len(records)


@pytest.mark.parametrize(
    "text",
    ["[" * 100_000, '[{"a": ' + "[" * 100_000, "[" + "[" * 5000 + "]" * 5000 + "]"],
    ids=["unclosed", "deep-field", "deep-but-valid"],
)
def test_deeply_nested_json_is_a_user_error(tmp_path, text):
    from warm_jax.data import hh_rlhf, qa_feedback

    (tmp_path / "dev.json").write_text(text)
    out = works_or_user_error(qa_feedback.parse_file, tmp_path / "dev.json")
    assert isinstance(out, UserError)
    (tmp_path / "x.jsonl").write_text(text.replace("[", '{"a":[', 1) + "\n")
    out = works_or_user_error(hh_rlhf.parse_file, tmp_path / "x.jsonl", "c")
    assert isinstance(out, UserError) and "x.jsonl:1" in str(out)


# ------------------------------------------------------------------------------ text corpus


@FAST
@given(
    text=st.text(alphabet=st.sampled_from(["a", " ", "\n", "\r", "\t", "é", "\x00"]), max_size=60)
)
def test_split_documents_keeps_every_non_blank_block(text):
    from warm_jax.data import text_corpus

    docs = text_corpus.split_documents(text)
    assert all(d and d == d.strip() and "\n\n" not in d for d in docs)

    def visible(s):
        return "".join(s.split())

    assert visible("".join(docs)) == visible(text)  # no content lost or invented


@FAST
@given(raw=st.binary(max_size=80), gz=st.booleans())
def test_read_text_on_any_bytes(tmp_path, raw, gz):
    from warm_jax.data import readers

    path = fresh_dir(tmp_path) / ("input.txt.gz" if gz else "input.txt")
    path.write_bytes(gzip.compress(raw) if gz and raw[:1] != b"x" else raw)
    out = works_or_user_error(readers.read_text, path)
    assert isinstance(out, (str, UserError))


# -------------------------------------------------------------------------------- tokenizers


@FAST
@given(
    tokenizer_json=st.binary(max_size=60) | json_values.map(lambda v: json.dumps(v).encode()),
    config_json=st.none()
    | st.binary(max_size=30)
    | json_values.map(lambda v: json.dumps(v).encode()),
)
def test_tokenizer_load_on_any_files(tmp_path, tokenizer_json, config_json):
    from warm_jax.data.tokenizer import Tokenizer

    d = fresh_dir(tmp_path)
    (d / "tokenizer.json").write_bytes(tokenizer_json)
    if config_json is not None:
        (d / "tokenizer_config.json").write_bytes(config_json)
    out = works_or_user_error(Tokenizer.load, d)
    assert isinstance(out, (Tokenizer, UserError))


@FAST
@given(
    config=st.dictionaries(
        st.sampled_from(["bos_token", "eos_token", "pad_token", "unk_token", "other"]),
        json_values,
        max_size=4,
    )
    | json_values
)
def test_tokenizer_config_of_any_shape_beside_a_good_tokenizer(tmp_path, config):
    from warm_jax.data.tokenizer import Tokenizer, train_tokenizer

    d = fresh_dir(tmp_path)
    train_tokenizer(["a b c <eos>"], 16, kind="word").save(d)
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    out = works_or_user_error(Tokenizer.load, d)
    if isinstance(out, Tokenizer):
        assert 0 <= out.eos_id < out.vocab_size


GGUF_KEYS = [
    "tokenizer.ggml.model",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.pre",
    "general.name",
]


def gguf_value():
    scalar = (
        st.sampled_from(["gpt2", "llama", "a", "b", "a b", "<eos>", "Ġ"])
        | st.text(max_size=6)
        | st.integers(0, 2**32 - 1)
        | st.booleans()
        | st.floats(allow_nan=True, width=32)
    )
    return scalar | st.lists(scalar, min_size=1, max_size=6)


def encode_gguf_value(value) -> tuple[int, bytes]:
    if isinstance(value, str):
        raw = value.encode("utf-8", "surrogatepass")
        return 8, struct.pack("<Q", len(raw)) + raw
    if isinstance(value, bool):
        return 7, struct.pack("<?", value)
    if isinstance(value, int):
        return 4, struct.pack("<I", value)
    if isinstance(value, float):
        return 6, struct.pack("<f", value)
    etype = encode_gguf_value(value[0])[0]
    parts = [encode_gguf_value(v) for v in value]
    body = b"".join(b for t, b in parts if t == etype) if len({t for t, _ in parts}) == 1 else b""
    return 9, struct.pack("<IQ", etype, len(value)) + body


@FAST
@given(
    kvs=st.lists(st.tuples(st.sampled_from(GGUF_KEYS), gguf_value()), max_size=7),
    header=st.tuples(st.sampled_from([2, 3, 1, 99]), st.integers(0, 3), st.integers(0, 2**63)),
    tail=st.binary(max_size=16),
    cut=st.none() | st.integers(0, 300),
)
def test_gguf_tokenizer_on_any_metadata(tmp_path, kvs, header, tail, cut):
    from warm_jax.data.tokenizer import Tokenizer

    version, tensors, declared = header
    count = len(kvs) if declared % 2 else declared  # the true count, or a lie
    out = [b"GGUF", struct.pack("<IQQ", version, tensors, count)]
    for key, value in kvs:
        vtype, body = encode_gguf_value(value)
        out += [struct.pack("<Q", len(key)) + key.encode(), struct.pack("<I", vtype), body]
    data = b"".join(out) + tail
    path = fresh_dir(tmp_path) / "m.gguf"
    path.write_bytes(data if cut is None else data[:cut])
    result = works_or_user_error(Tokenizer.load, path)
    assert isinstance(result, (Tokenizer, UserError))


@pytest.mark.parametrize(
    "body",
    [
        struct.pack("<Q", 2**62),  # a key claiming 4 EiB
        struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 9, 1) * 5000,  # arrays in arrays
    ],
    ids=["huge-string", "nested-arrays"],
)
def test_gguf_lengths_and_nesting_that_cannot_be_real(tmp_path, body):
    from warm_jax.data.tokenizer import Tokenizer

    (tmp_path / "m.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + body)
    out = works_or_user_error(Tokenizer.load, tmp_path / "m.gguf")
    assert isinstance(out, UserError) and "m.gguf" in str(out)


# ------------------------------------------------------------------------ gin on the CLI


@pytest.fixture(scope="module")
def configurables():
    from warm_jax import config as cfg

    cfg.import_configurables()


names = st.sampled_from(
    [
        "train.num_steps",
        "pretrain/train.seed",
        "make_optimizer.learning_rate",
        "make_optimizer.clip_norm",
        "model_config.d_model",
        "train.progress",
        "pretrain.corpus",
        "train.nope",
        "nope.x",
        "",
        ".",
        "train.",
        "a/b/c.d",
        "train.num_steps.x",
    ]
) | st.text(alphabet=st.sampled_from(list("ab._/-=%@ ()'\"0\n#\\")), max_size=12)
values = st.sampled_from(
    [
        "1",
        "-5",
        "1.5",
        "1e400",
        "nan",
        "'abc'",
        "None",
        "True",
        "(1,",
        "[1, 2]",
        "@nope",
        "%MISSING",
        "@make_optimizer",
        "{'a': 1}",
        "",
        "'",
        "\\",
        "0x10",
        "1 2",
        "import os",
    ]
) | st.text(max_size=10)


@FAST
@given(name=names, value=values, form=st.sampled_from(["=", " "]))
def test_gin_flags_parse_or_are_a_user_error(configurables, name, value, form):
    import gin

    from warm_jax import cli
    from warm_jax import config as cfg

    argv = [f"--gin.{name}={value}"] if form == "=" else [f"--gin.{name}", value]
    split = works_or_user_error(cli.split_gin_bindings, argv)
    if isinstance(split, UserError):
        return
    rest, bindings = split
    assert rest in ([], argv[1:])  # `--gin.a=b c`: the second word is an ordinary argument
    out = works_or_user_error(cfg.parse, [], bindings)
    if not isinstance(out, UserError):
        # Whatever was accepted has the type its parameter declares.
        for (_, selector), params in gin.config._CONFIG.items():
            if selector.endswith("loop.train") and "num_steps" in params:
                v = params["num_steps"]
                assert isinstance(v, gin.config.ConfigurableReference) or type(v) is int


@FEW
@given(
    text=st.text(alphabet=st.sampled_from(list("abtrain._=/%@()'\"0123\n#include ")), max_size=40)
    | st.binary(max_size=40).map(lambda b: b.decode("latin-1"))
)
def test_gin_files_of_any_content_parse_or_are_a_user_error(tmp_path, configurables, text):
    from warm_jax import config as cfg

    path = fresh_dir(tmp_path) / "x.gin"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    works_or_user_error(cfg.parse, [str(path)], [])


def test_cli_turns_bad_gin_flags_and_files_into_messages(tmp_path, capsys, monkeypatch):
    """End to end through `warm-jax pretrain`, with the job itself stubbed out: the point is
    what happens to the flags before any work starts."""
    from warm_jax import cli
    from warm_jax.experiments import pretrain

    calls = []

    def fake_pretrain(workdir):
        import gin

        calls.append(gin.query_parameter("train.num_steps") if gin.config._CONFIG else None)

        class Result:
            history, step, workdir = [], 0, tmp_path

        return Result()

    monkeypatch.setattr(pretrain, "pretrain", fake_pretrain)
    base = ["pretrain", "--workdir", str(tmp_path)]
    cases = {
        "--gin.train.num_steps='abc'": "expected int",
        "--gin.train.num_steps=abc": "invalid gin configuration",
        "--gin.train.num_steps=%UNDEFINED": "macro %UNDEFINED is not defined",
        "--gin.train.num_steps=(1,": "invalid gin configuration",
        "--gin.nope.x=1": "No configurable matching 'nope'",
        "--gin.train.nope=1": "doesn't have a parameter named 'nope'",
        "--gin.=1": "without a name",
        "--gin.model_config.d_model=1.5": "expected int",
        "--gin.train.seed=1\nimport no_such_module": "No module named 'no_such_module'",
        "--gin.train.seed=1\ninclude 'no/such.gin'": "Unable to open file: no/such.gin",
    }
    for flag, message in cases.items():
        assert cli.main([*base, flag]) == 2, flag
        err = capsys.readouterr().err
        assert "warm-jax pretrain: error:" in err and message in err, (flag, err)
    assert cli.main([*base, "--gin_file", "no/such/file"]) == 2
    assert "gin file not found: 'no/such/file'" in capsys.readouterr().err
    (tmp_path / "broken.gin").write_text("train.num_steps = (1,\n")
    assert cli.main([*base, "--gin_file", str(tmp_path / "broken.gin")]) == 2
    assert "invalid gin configuration" in capsys.readouterr().err
    assert cli.main([*base, "--gin.train.num_steps=7"]) == 0
    assert calls == [7]


# ---------------------------------------------------------------------------------- merges

finite_or_not = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, -0.0, 1.0, 0.5, 1e308, -1e-320, 2.0]
)


@FAST
@given(
    method=st.sampled_from(["average", "slerp", "liti", "ties", ""]),
    n=st.integers(-1, 5),
    has_base=st.booleans(),
    weights=st.none() | st.lists(finite_or_not, max_size=6),
    t=st.none() | finite_or_not,
    eta=st.none() | finite_or_not,
    granularity=st.sampled_from(["layer", "leaf", "tree", "row"]),
)
def test_merge_spec_accepts_only_coefficients_it_can_apply(
    method, n, has_base, weights, t, eta, granularity
):
    from warm_jax import merging_checkpoints as mc

    spec = works_or_user_error(
        mc.make_spec, method, n, has_base=has_base, weights=weights, t=t, eta=eta,
        granularity=granularity,
    )  # fmt: skip
    if isinstance(spec, UserError):
        return
    if spec.weights is not None:
        w = np.asarray(spec.weights)
        assert np.all(np.isfinite(w)) and np.all(w >= 0) and abs(w.sum() - 1) < 1e-9
    for coefficient in (spec.t, spec.eta):
        assert coefficient is None or 0.0 <= coefficient <= 1.0


@pytest.fixture(scope="module")
def merge_inputs(tmp_path_factory):
    from warm_jax.training import checkpoints as ck

    root = tmp_path_factory.mktemp("merge")
    paths = []
    for i in range(3):
        rng = np.random.default_rng(i)
        tree = {
            f"layer_{j}": {"w": rng.standard_normal((4, 3)).astype(np.float32)} for j in range(2)
        }
        paths.append(ck.save_params(root / f"m{i}", {"params": tree}))
    return paths


@FEW
@given(
    method=st.sampled_from(["average", "slerp", "liti"]),
    weights=st.none() | st.lists(finite_or_not, min_size=2, max_size=2),
    t=st.none() | finite_or_not,
    eta=st.none() | finite_or_not,
)
def test_merges_with_any_coefficients_are_finite_or_refused(
    tmp_path, merge_inputs, method, weights, t, eta
):
    import jax

    from warm_jax import merging_checkpoints as mc
    from warm_jax.training import checkpoints as ck

    base = merge_inputs[0] if method != "average" else None
    out = fresh_dir(tmp_path) / "out"
    result = works_or_user_error(
        mc.merge_checkpoints, method, merge_inputs[1:], out, base=base, weights=weights, t=t,
        eta=eta, progress=False,
    )  # fmt: skip
    if isinstance(result, UserError):
        assert not out.exists()
    else:
        merged = jax.device_get(ck.load_params(out))
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(merged))


def test_merge_of_trees_that_do_not_match_is_a_user_error(tmp_path, merge_inputs):
    from warm_jax import merging_checkpoints as mc
    from warm_jax.training import checkpoints as ck

    other = ck.save_params(
        tmp_path / "other", {"params": {"layer_0": {"w": np.zeros((3, 4), np.float32)}}}
    )
    out = works_or_user_error(
        mc.merge_checkpoints, "average", [merge_inputs[1], other], tmp_path / "o"
    )
    assert isinstance(out, UserError) and "other" in str(out)
