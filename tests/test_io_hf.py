"""Checkpoint import/export: Hugging Face safetensors (Llama, Gemma) and small GGUF files.

Every imported model is checked against `reference_logits`, a float64 numpy forward pass written
here from the published conventions (HF tensor names, PyTorch [out, in] weights), independently
of `warm_jax.models`. The GGUF checks use llama.cpp's own RoPE (adjacent pairs) on the permuted
weights as stored, so they also validate the un-permutation.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from warm_jax.data.tokenizer import Tokenizer, train_tokenizer
from warm_jax.errors import UserError
from warm_jax.experiments import checkpoint_io, sft
from warm_jax.io import formats, gguf_weights, hf
from warm_jax.models import transformer as tm
from warm_jax.training import checkpoints

TEXTS = ["the cat sat on the mat", "a dog ran to the park", "the bird sang in the tree"] * 3
IDS = [[5, 17, 3, 250, 42, 8, 1, 99], [7, 7, 300, 2]]


# ----------------------------------------------------------------------------- reference


def reference_logits(
    w: dict, hf_config: dict, batch: list[list[int]], rope: str = "half"
) -> list[np.ndarray]:
    """Logits [T, V] of each sequence, float64. `w` holds numpy weights by role: `embed` [V, D],
    `final_norm`, optional `lm_head` [V, D], and `layers`: dicts with q, k, v, o, gate, up, down
    ([out, in]) and attn_norm, mlp_norm. rope="half": HF rotate-half; "pairs": llama.cpp's
    rotation of adjacent pairs (for GGUF weights as stored)."""
    c = hf_config
    gemma = c["model_type"] == "gemma"
    d, n_h, n_kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or d // n_h
    eps, base = c["rms_norm_eps"], c["rope_theta"]

    def f64(x):
        return np.asarray(x, np.float64)

    def norm(x, weight):
        y = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)
        return y * ((1.0 + weight) if gemma else weight)

    def rotate(x):  # [T, n, hd]
        t = x.shape[0]
        ang = np.arange(t)[:, None] * (base ** (-np.arange(0, hd, 2) / hd))[None, :]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        if rope == "half":
            x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
            return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
        out = np.empty_like(x)
        xe, xo = x[..., 0::2], x[..., 1::2]
        out[..., 0::2] = xe * cos - xo * sin
        out[..., 1::2] = xe * sin + xo * cos
        return out

    def act(x):
        if gemma:
            return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
        return x / (1 + np.exp(-x))

    def attention(h, lw):
        t = h.shape[0]
        q = rotate((h @ lw["q"].T).reshape(t, n_h, hd))
        k = rotate((h @ lw["k"].T).reshape(t, n_kv, hd))
        v = (h @ lw["v"].T).reshape(t, n_kv, hd)
        k, v = np.repeat(k, n_h // n_kv, 1), np.repeat(v, n_h // n_kv, 1)
        s = np.einsum("thd,shd->hts", q, k) / math.sqrt(hd)
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return np.einsum("hts,shd->thd", p, v).reshape(t, n_h * hd) @ lw["o"].T

    embed = f64(w["embed"])
    xs = [embed[ids] * (math.sqrt(d) if gemma else 1.0) for ids in batch]
    for layer in w["layers"]:  # one layer's weights in float64 at a time, for every sequence
        lw = {k: f64(v) for k, v in layer.items()}
        for i, x in enumerate(xs):
            x = x + attention(norm(x, lw["attn_norm"]), lw)
            h = norm(x, lw["mlp_norm"])
            xs[i] = x + (act(h @ lw["gate"].T) * (h @ lw["up"].T)) @ lw["down"].T
    head = f64(w["lm_head"]) if "lm_head" in w else embed
    return [norm(x, f64(w["final_norm"])) @ head.T for x in xs]


def our_batch_logits(params, config, batch: list[list[int]]) -> list[np.ndarray]:
    """Our logits for each sequence, from one right-padded batch (one compilation)."""
    t = max(len(ids) for ids in batch)
    tokens = np.zeros((len(batch), t), np.int32)
    segments = np.zeros((len(batch), t), np.int32)
    for i, ids in enumerate(batch):
        tokens[i, : len(ids)], segments[i, : len(ids)] = ids, 1
    fwd = jax.jit(lambda p, x, s: tm.apply(p, config, x, segment_ids=s))
    logits = np.asarray(fwd(params, tokens, segments))
    return [logits[i, : len(ids)] for i, ids in enumerate(batch)]


def roles_from_hf(tensors: dict, n_layers: int) -> dict:
    """The reference's roles, read from HF names (written out here, not taken from warm_jax)."""
    layer = "model.layers.{}."
    names = {
        "q": "self_attn.q_proj.weight",
        "k": "self_attn.k_proj.weight",
        "v": "self_attn.v_proj.weight",
        "o": "self_attn.o_proj.weight",
        "gate": "mlp.gate_proj.weight",
        "up": "mlp.up_proj.weight",
        "down": "mlp.down_proj.weight",
        "attn_norm": "input_layernorm.weight",
        "mlp_norm": "post_attention_layernorm.weight",
    }
    out = {
        "embed": tensors["model.embed_tokens.weight"],
        "final_norm": tensors["model.norm.weight"],
        "layers": [
            {role: tensors[layer.format(i) + n] for role, n in names.items()}
            for i in range(n_layers)
        ],
    }
    if "lm_head.weight" in tensors:
        out["lm_head"] = tensors["lm_head.weight"]
    return out


# ----------------------------------------------------------------------------- fixtures


def llama_config(**overrides) -> dict:
    c = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 320,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    }
    c.update(overrides)
    return c


def gemma_config(**overrides) -> dict:
    c = {
        "architectures": ["GemmaForCausalLM"],
        "model_type": "gemma",
        "vocab_size": 320,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "gelu",
        "hidden_activation": "gelu_pytorch_tanh",
    }
    c.update(overrides)
    return c


def random_hf_tensors(c: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under HF names, written from the HF layout alone."""
    rng = np.random.default_rng(seed)
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    n_h, n_kv = c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or d // n_h
    gemma = c["model_type"] == "gemma"

    def mat(out, inp):
        return (rng.normal(size=(out, inp)) / math.sqrt(inp)).astype(np.float32)

    def norm_w():  # Gemma stores w of (1 + w) around 0, Llama the scale around 1
        return (rng.normal(size=(d,)) * 0.1 + (0.0 if gemma else 1.0)).astype(np.float32)

    t = {"model.embed_tokens.weight": (rng.normal(size=(v, d)) * 0.5).astype(np.float32)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = mat(n_h * hd, d)
        t[p + "self_attn.k_proj.weight"] = mat(n_kv * hd, d)
        t[p + "self_attn.v_proj.weight"] = mat(n_kv * hd, d)
        t[p + "self_attn.o_proj.weight"] = mat(d, n_h * hd)
        t[p + "mlp.gate_proj.weight"] = mat(f, d)
        t[p + "mlp.up_proj.weight"] = mat(f, d)
        t[p + "mlp.down_proj.weight"] = mat(d, f)
        t[p + "input_layernorm.weight"] = norm_w()
        t[p + "post_attention_layernorm.weight"] = norm_w()
    t["model.norm.weight"] = norm_w()
    if not c.get("tie_word_embeddings", True):
        t["lm_head.weight"] = mat(v, d)
    return t


def word_tokenizer() -> Tokenizer:
    return train_tokenizer(TEXTS, 64, kind="word")


def write_hf_dir(directory: Path, c: dict, tensors: dict, *, shards: int = 1) -> Path:
    """An HF directory as `save_pretrained` lays it out: sharded with an index when shards > 1."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(c))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"))
    else:
        weight_map = {}
        for s in range(shards):
            part = names[s::shards]
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in part}, str(directory / fname))
            weight_map.update(dict.fromkeys(part, fname))
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    word_tokenizer().save(directory)
    return directory


def assert_trees_equal(a, b) -> None:
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    assert len(flat_a) == len(flat_b)
    for path, x in flat_a:
        y = flat_b[path]
        assert np.asarray(x).dtype == np.asarray(y).dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------- HF import


@pytest.mark.parametrize(
    "make_config,shards",
    [(llama_config, 3), (lambda: llama_config(tie_word_embeddings=True), 1), (gemma_config, 2)],
    ids=["llama-untied-sharded", "llama-tied", "gemma-mqa"],
)
def test_hf_checkpoint_imports_and_matches_reference(tmp_path, make_config, shards):
    c = make_config()
    tensors = random_hf_tensors(c)
    src = write_hf_dir(tmp_path / "hf", c, tensors, shards=shards)

    imported = checkpoint_io.import_checkpoint(f"hf:{src}", tmp_path / "model")
    assert imported.config.n_layers == 2 and imported.config.vocab_size == 320
    assert imported.config.tie_embeddings == c.get("tie_word_embeddings", True)
    # The model directory loads like any pretrain/SFT workdir.
    config, tok, params = sft.load_model(tmp_path / "model")
    assert config == imported.config
    assert tok.encode("the cat") == word_tokenizer().encode("the cat")
    assert (tmp_path / "model" / "model.gin").is_file()
    ref_w = roles_from_hf(tensors, c["num_hidden_layers"])
    refs = reference_logits(ref_w, c, IDS)
    for got, ref in zip(our_batch_logits(params, config, IDS), refs):
        assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
        assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_num_layers_keeps_the_first_layers(tmp_path):
    c = llama_config()
    tensors = random_hf_tensors(c)
    src = write_hf_dir(tmp_path / "hf", c, tensors)
    imported = formats.load_external(f"hf:{src}", num_layers=1)
    assert imported.config.n_layers == 1
    assert sorted(k for k in imported.params["params"] if k.startswith("block_")) == ["block_0"]
    ref_w = roles_from_hf(tensors, 1)  # the same computation with only layer 0
    refs = reference_logits(ref_w, c, IDS)
    for got, ref in zip(our_batch_logits(imported.params, imported.config, IDS), refs):
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(UserError, match="num_layers=3"):
        formats.load_external(f"hf:{src}", num_layers=3)


def test_model_gin_rebuilds_the_imported_shape(tmp_path):
    import gin

    from warm_jax import config as cfg

    c = gemma_config()
    src = write_hf_dir(tmp_path / "hf", c, random_hf_tensors(c))
    imported = checkpoint_io.import_checkpoint(f"hf:{src}", tmp_path / "model")
    cfg.parse([str(tmp_path / "model" / "model.gin")], [])
    assert tm.model_config() == imported.config
    gin.clear_config()


# ----------------------------------------------------------------------------- export


def _random_model_dir(tmp_path: Path, c: dict, *, reward: bool, param_dtype="float32") -> Path:
    src = write_hf_dir(tmp_path / "src_hf", c, random_hf_tensors(c, seed=1))
    model_dir = tmp_path / "model"
    checkpoint_io.import_checkpoint(f"hf:{src}", model_dir, param_dtype=param_dtype)
    if reward:  # a trained reward head, bias included
        config, _, params = sft.load_model(model_dir)
        params = jax.tree.map(np.asarray, params)
        rng = np.random.default_rng(3)
        head = params["params"]["reward_head"]
        head["kernel"] = rng.normal(size=head["kernel"].shape).astype(head["kernel"].dtype)
        head["bias"] = np.asarray([0.75], head["bias"].dtype)
        checkpoints.save_params(model_dir / "rm", params, {"model": config.to_dict()})
        return model_dir / "rm"
    return model_dir


@pytest.mark.parametrize(
    "make_config,reward,param_dtype",
    [
        (llama_config, True, "float32"),
        (gemma_config, False, "float32"),
        (lambda: llama_config(tie_word_embeddings=True), True, "bfloat16"),
    ],
    ids=["llama-reward", "gemma-policy", "llama-tied-bf16-reward"],
)
def test_export_then_import_is_bit_exact(tmp_path, make_config, reward, param_dtype):
    c = make_config()
    source = _random_model_dir(tmp_path, c, reward=reward, param_dtype=param_dtype)
    model_dir = tmp_path / "model"
    path, head = checkpoint_io.export_checkpoint(
        source, f"hf:{tmp_path / 'out'}", model_dir=str(model_dir)
    )
    assert head == ("reward" if reward else "causal-lm")
    written = json.loads((path / "config.json").read_text())
    family = "Llama" if c["model_type"] == "llama" else "Gemma"
    suffix = "ForSequenceClassification" if reward else "ForCausalLM"
    assert written["architectures"] == [family + suffix]
    assert written["torch_dtype"] == param_dtype
    assert (path / "tokenizer.json").is_file()

    back = checkpoint_io.import_checkpoint(f"hf:{path}", tmp_path / "back", param_dtype=param_dtype)
    config, _, _ = sft.load_model(model_dir)
    original = checkpoints.load_params(source)
    assert back.config == config
    assert_trees_equal(original, back.params)


def test_export_shards_large_models_and_reads_them_back(tmp_path):
    c = llama_config()
    model_dir = _random_model_dir(tmp_path, c, reward=False)
    config, tok, params = sft.load_model(model_dir)
    params = jax.tree.map(np.asarray, params)
    files = hf.write_hf_dir(tmp_path / "out", params, config, tokenizer=tok, max_shard_bytes=40_000)
    assert len(files) > 2
    index = json.loads((tmp_path / "out" / hf.INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    config2, params2 = hf.read_hf_dir(tmp_path / "out")
    assert config2 == config
    assert_trees_equal(params, params2)
    # A policy's export has no classifier (the reward head is untrained).
    assert not any(n.startswith("score") for n in index["weight_map"])


def test_export_and_import_through_the_subcommand_parser(tmp_path, capsys):
    c = llama_config()
    src = write_hf_dir(tmp_path / "hf", c, random_hf_tensors(c))

    def run(command: str, *argv: str) -> int:
        parser = argparse.ArgumentParser(prog=f"warm-jax {command}")
        checkpoint_io.add_arguments(parser)
        args = parser.parse_args(list(argv))
        args.gin_bindings = []
        return checkpoint_io.run(args)

    assert run("import", "--from", f"hf:{src}", "--to", str(tmp_path / "m")) == 0
    assert "parameters: 2 layers, width 32" in capsys.readouterr().out
    with pytest.raises(UserError, match="not empty"):
        run("import", "--from", f"hf:{src}", "--to", str(tmp_path / "m"))
    assert run("import", "--from", f"hf:{src}", "--to", str(tmp_path / "m"), "--overwrite") == 0
    assert run("export", "--from", str(tmp_path / "m"), "--to", f"hf:{tmp_path / 'o'}") == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    assert (
        run(
            "export",
            "--from",
            str(tmp_path / "m"),
            "--to",
            f"hf:{tmp_path / 'r'}",
            "--head",
            "reward",
        )
        == 0
    )
    written = json.loads((tmp_path / "r" / "config.json").read_text())
    assert written["architectures"] == ["LlamaForSequenceClassification"]
    assert written["num_labels"] == 1


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "change,message",
    [
        ({"model_type": "gemma2"}, "soft-capping"),
        ({"model_type": "qwen2"}, "not supported"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_hidden_layers": 3}, "no tensor 'model.layers.2"),
        ({"intermediate_size": 40}, "has shape"),
    ],
)
def test_unsupported_or_inconsistent_checkpoints_are_refused(tmp_path, change, message):
    tensors = random_hf_tensors(llama_config())
    src = write_hf_dir(tmp_path / "hf", llama_config(**change), tensors)
    with pytest.raises(UserError, match=message):
        formats.load_external(f"hf:{src}")


def test_unused_tensors_and_bad_locations_are_refused(tmp_path):
    c = llama_config()
    tensors = random_hf_tensors(c)
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)
    src = write_hf_dir(tmp_path / "hf", c, tensors)
    with pytest.raises(UserError, match="does not use"):
        formats.load_external(f"hf:{src}")
    with pytest.raises(UserError, match="not a checkpoint location"):
        formats.load_external(str(src))
    with pytest.raises(UserError, match=r"no config\.json"):
        formats.load_external(f"hf:{tmp_path}")
    with pytest.raises(UserError, match="not a checkpoint location"):
        formats.export_external("gguf:/x.gguf", {}, tm.TransformerConfig())
    with pytest.raises(UserError, match="no Hugging Face family"):
        hf.hf_config_from(tm.TransformerConfig(embed_scale=True))


# ----------------------------------------------------------------------------- PyTorch


def test_pytorch_loads_the_export_with_the_same_outputs(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    for name, c in (("llama", llama_config()), ("gemma", gemma_config())):
        source = _random_model_dir(tmp_path / name, c, reward=True)
        model_dir = tmp_path / name / "model"
        config, _, _ = sft.load_model(model_dir)
        params = checkpoints.load_params(source)
        for head in ("causal-lm", "reward"):
            out = tmp_path / name / head
            checkpoint_io.export_checkpoint(
                source, f"hf:{out}", head=head, model_dir=str(model_dir)
            )
            auto = (
                transformers.AutoModelForCausalLM
                if head == "causal-lm"
                else transformers.AutoModelForSequenceClassification
            )
            model = auto.from_pretrained(out, dtype=torch.float32).eval()
            for ids, logits in zip(IDS, our_batch_logits(params, config, IDS)):
                with torch.no_grad():
                    theirs = model(torch.tensor([ids])).logits.numpy()[0]
                if head == "causal-lm":
                    ours = logits
                else:  # HF's classifier has no bias: scores differ by exactly that constant
                    r = tm.apply(params, config, np.asarray([ids], np.int32), output="reward")
                    ours = np.asarray(r) - np.asarray(params["params"]["reward_head"]["bias"])
                np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- GGUF


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `LlamaModel.permute`, restated."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def test_unpermute_inverts_llamacpp_permutation():
    w = np.arange(6 * 8 * 5, dtype=np.float32).reshape(6 * 8, 5)
    for heads in (1, 3, 6):
        np.testing.assert_array_equal(
            gguf_weights.unpermute_rows(llamacpp_permute(w, heads), heads), w
        )


def write_tiny_gguf(path: Path, c: dict, tensors: dict) -> dict:
    """A Llama GGUF as llama.cpp's converter writes it (names, Q/K permuted, byte-level BPE
    tokenizer in the metadata); returns its tensors by GGUF name as stored."""
    gguf = pytest.importorskip("gguf")
    from tokenizers import pre_tokenizers

    w = gguf.GGUFWriter(str(path), "llama")
    n_h, n_kv = c["num_attention_heads"], c["num_key_value_heads"]
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(n_h)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_dimension_count(c["hidden_size"] // n_h)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = specials + byte_chars
    tokens += [f"<extra_{i}>" for i in range(c["vocab_size"] - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    gguf_names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    block = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    stored = {}
    for name, x in tensors.items():
        if name in gguf_names:
            g = gguf_names[name]
        else:
            _, _, i, rest = name.split(".", 3)
            g = f"blk.{i}.{block[rest.removesuffix('.weight')]}.weight"
        if "q_proj" in name:
            x = llamacpp_permute(x, n_h)
        elif "k_proj" in name:
            x = llamacpp_permute(x, n_kv)
        stored[g] = x
        w.add_tensor(g, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def test_gguf_import_unpermutes_and_matches_llamacpp_reference(tmp_path):
    c = llama_config()
    tensors = random_hf_tensors(c)
    stored = write_tiny_gguf(tmp_path / "tiny.gguf", c, tensors)
    imported = checkpoint_io.import_checkpoint(f"gguf:{tmp_path / 'tiny.gguf'}", tmp_path / "m")
    assert imported.tokenizer.eos_id == 2 and imported.tokenizer.bos_id == 1
    assert imported.tokenizer.decode(imported.tokenizer.encode("Hi there!")) == "Hi there!"
    # Same parameters as the HF checkpoint the GGUF was made from (F32: exactly).
    src = write_hf_dir(tmp_path / "hf", c, tensors)
    assert_trees_equal(formats.load_external(f"hf:{src}").params, imported.params)
    # And the same logits as llama.cpp's computation on the weights as stored.
    ref_w = {
        "embed": stored["token_embd.weight"],
        "final_norm": stored["output_norm.weight"],
        "lm_head": stored["output.weight"],
        "layers": [
            {
                role: stored[f"blk.{i}.{g}.weight"]
                for role, g in (
                    ("q", "attn_q"),
                    ("k", "attn_k"),
                    ("v", "attn_v"),
                    ("o", "attn_output"),
                    ("gate", "ffn_gate"),
                    ("up", "ffn_up"),
                    ("down", "ffn_down"),
                    ("attn_norm", "attn_norm"),
                    ("mlp_norm", "ffn_norm"),
                )
            }
            for i in range(c["num_hidden_layers"])
        ],
    }
    config, _, params = sft.load_model(tmp_path / "m")
    refs = reference_logits(ref_w, c, IDS, rope="pairs")
    wrongs = reference_logits(ref_w, c, IDS, rope="half")
    for ours, ref, wrong in zip(our_batch_logits(params, config, IDS), refs, wrongs):
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
        # Without un-permuting, the half-rotation would compute something else.
        assert np.abs(wrong - ref).max() > 1e-3
