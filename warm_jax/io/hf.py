"""Hugging Face checkpoints of the Llama and Gemma families: `config.json` + `*.safetensors`.

Three pure mappings and two directory functions:

* `config_from_hf(hf_config)` / `hf_config_from(config, ...)`: HF `config.json` <-> our
  `TransformerConfig` (anything our model cannot compute exactly is refused, never approximated);
* `params_from_hf(tensors, config)` / `hf_tensors_from(params, config)`: HF tensor names and
  PyTorch `[out, in]` matrices <-> our parameter tree;
* `read_hf_dir(dir)` / `write_hf_dir(dir, ...)`: the files, sharded or not.

Both families already store Q/K in the rotate-half RoPE convention our model uses (HF's own Llama
conversion permutes Meta's interleaved weights once), so no permutation happens here.

The reward head is written as `score.weight` (what `*ForSequenceClassification` reads) and, since
HF's scoring layer has no bias, our bias goes to `score.bias`, which PyTorch stacks load with an
"unused weights" warning and ignore: their scores are ours minus that constant, which changes no
preference (the Bradley-Terry loss only sees differences). Keeping it in the file makes an
export -> import round trip exact.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from warm_jax.errors import UserError
from warm_jax.models import transformer as tm

PyTree = Any
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"
HEADS = ("causal-lm", "reward")
FAMILIES = ("llama", "gemma")

# (our leaf path inside a block, HF name inside `model.layers.{i}.`)
_BLOCK_LEAVES = (
    (("attn", "q"), "self_attn.q_proj.weight"),
    (("attn", "k"), "self_attn.k_proj.weight"),
    (("attn", "v"), "self_attn.v_proj.weight"),
    (("attn", "o"), "self_attn.o_proj.weight"),
    (("mlp", "gate"), "mlp.gate_proj.weight"),
    (("mlp", "up"), "mlp.up_proj.weight"),
    (("mlp", "down"), "mlp.down_proj.weight"),
    (("attn_norm", "scale"), "input_layernorm.weight"),
    (("mlp_norm", "scale"), "post_attention_layernorm.weight"),
)


# ----------------------------------------------------------------------------- configs


def family_of(config: tm.TransformerConfig) -> str:
    """'llama' or 'gemma': the HF family whose computation equals our model's with `config`."""
    gemma = (config.embed_scale, config.norm_offset, config.mlp_activation)
    if gemma == (False, False, "silu"):
        return "llama"
    if gemma == (True, True, "gelu_tanh"):
        return "gemma"
    raise UserError(
        f"no Hugging Face family computes this model (embed_scale={config.embed_scale}, "
        f"norm_offset={config.norm_offset}, mlp_activation={config.mlp_activation!r}): Llama "
        "needs (False, False, 'silu'), Gemma (True, True, 'gelu_tanh')"
    )


def config_from_hf(hf: Mapping[str, Any], *, param_dtype: str = "float32") -> tm.TransformerConfig:
    """Our config for an HF `config.json` of the Llama or Gemma (1) family."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        hint = (
            " (Gemma 2/3 add logit soft-capping, sliding windows and extra norms, which this "
            "model does not compute)"
            if str(model_type).startswith("gemma")
            else ""
        )
        raise UserError(
            f"config.json: model_type={model_type!r} is not supported; choose from "
            f"{list(FAMILIES)}{hint}"
        )
    scaling = hf.get("rope_scaling")
    if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
        raise UserError(
            f"config.json: rope_scaling={scaling} is not supported (only plain RoPE); the "
            "logits would be wrong past the original context"
        )
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise UserError(f"config.json: {key}=true is not supported (no biases in this model)")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if model_type == "llama" and act != "silu":
        raise UserError(f"config.json: hidden_act={act!r} is not supported for Llama (silu)")
    n_heads = int(hf["num_attention_heads"])
    d_model = int(hf["hidden_size"])
    gemma = model_type == "gemma"
    return tm.TransformerConfig(
        vocab_size=int(hf["vocab_size"]),
        d_model=d_model,
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or d_model // n_heads),
        d_ff=int(hf["intermediate_size"]),
        max_len=int(hf.get("max_position_embeddings", 2048)),
        rope_base=float(hf.get("rope_theta", 10000.0)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6 if gemma else 1e-5)),
        # Gemma ties by construction (its config may not even say so).
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        param_dtype=param_dtype,
        dtype=param_dtype,
        # HF's Gemma computes gelu with the tanh approximation whatever `hidden_act` says.
        mlp_activation="gelu_tanh" if gemma else "silu",
        embed_scale=gemma,
        norm_offset=gemma,
    )


def hf_config_from(
    config: tm.TransformerConfig,
    *,
    head: str = "causal-lm",
    torch_dtype: str = "float32",
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
) -> dict[str, Any]:
    """The `config.json` with which `transformers` builds the same computation."""
    if head not in HEADS:
        raise UserError(f"head={head!r}; choose from {list(HEADS)}")
    family = family_of(config)
    cls = {"llama": "Llama", "gemma": "Gemma"}[family]
    suffix = "ForSequenceClassification" if head == "reward" else "ForCausalLM"
    out: dict[str, Any] = {
        "architectures": [f"{cls}{suffix}"],
        "model_type": family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base,
        "rope_scaling": None,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,  # the key transformers >= 4.56 reads
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
    }
    if family == "llama":
        out.update(hidden_act="silu", mlp_bias=False)
    else:
        out.update(hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh")
    if head == "reward":
        # One label: `logits[:, 0]` is the reward of the sequence's last non-pad token.
        out.update(id2label={"0": "reward"}, label2id={"reward": 0}, num_labels=1)
    return out


# ----------------------------------------------------------------------------- tensors


def _expect(tensors: Mapping[str, Any], name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in tensors:
        raise UserError(f"checkpoint has no tensor {name!r}")
    x = tensors[name]
    if tuple(x.shape) != shape:
        raise UserError(
            f"tensor {name!r} has shape {tuple(x.shape)}, expected {shape} from config.json"
        )
    return np.asarray(x)


def params_from_hf(
    tensors: Mapping[str, Any], config: tm.TransformerConfig, *, prefix: str = "model."
) -> PyTree:
    """Our parameter tree from HF-named tensors (numpy-like, PyTorch `[out, in]` layout).

    Values are converted to `config.param_dtype`. The reward head comes from `score.*` when
    present, else is zero (the project's initialisation). Unknown tensors are refused, so a
    checkpoint of another architecture never loads half-silently."""
    c = config
    dtype = np.dtype(tm.DTYPES[c.param_dtype])
    d, h, k, hd, f, v = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff, c.vocab_size
    used: set[str] = set()

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        used.add(name)
        return _expect(tensors, name, shape)

    def cast(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x.astype(dtype, copy=False))

    shapes = {
        "q": (h * hd, d),
        "k": (k * hd, d),
        "v": (k * hd, d),
        "o": (d, h * hd),
        "gate": (f, d),
        "up": (f, d),
        "down": (d, f),
        "scale": (d,),
    }

    def ours(leaf: str, w: np.ndarray) -> np.ndarray:
        # PyTorch Linear weights are [out, in]; ours are [in, (heads, head_dim) | out].
        if leaf in ("q", "k", "v"):
            return w.T.reshape(d, -1, hd)
        if leaf == "o":
            return w.T.reshape(h, hd, d)
        if leaf == "scale":
            return w
        return w.T

    params: dict[str, Any] = {
        "embed": {"embedding": cast(get(f"{prefix}embed_tokens.weight", (v, d)))},
        "final_norm": {"scale": cast(get(f"{prefix}norm.weight", (d,)))},
    }
    for i in range(c.n_layers):
        block: dict[str, dict[str, np.ndarray]] = {}
        for (module, leaf), hf_name in _BLOCK_LEAVES:
            w = get(f"{prefix}layers.{i}.{hf_name}", shapes[leaf])
            block.setdefault(module, {})[leaf] = cast(ours(leaf, w))
        params[f"block_{i}"] = block
    if not c.tie_embeddings:
        params["lm_head"] = cast(get("lm_head.weight", (v, d)).T)
    kernel = get("score.weight", (1, d)).T if "score.weight" in tensors else np.zeros((d, 1))
    bias = get("score.bias", (1,)) if "score.bias" in tensors else np.zeros((1,))
    params["reward_head"] = {"kernel": cast(kernel), "bias": cast(bias)}
    # Tied checkpoints sometimes carry a copy of the embedding as lm_head: harmless.
    ignorable = {"lm_head.weight"} if c.tie_embeddings else set()
    extra = sorted(
        n for n in tensors if n not in used and n not in ignorable and "rotary_emb" not in n
    )
    if extra:
        raise UserError(
            f"checkpoint has {len(extra)} tensors this model does not use, e.g. {extra[:3]} "
            "(another architecture, or a config.json that does not match the weights)"
        )
    return {"params": params}


def hf_tensors_from(
    params: PyTree, config: tm.TransformerConfig, *, head: str = "causal-lm"
) -> dict[str, np.ndarray]:
    """HF-named numpy tensors of our parameters, in their own dtype (the inverse of
    `params_from_hf`). The reward head is written for `head='reward'` and otherwise only when it
    is non-zero, so a policy's export carries no stray classifier."""
    c = config
    p = params.get("params", params)

    def host(x: Any) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(x))

    def torch_layout(leaf: str, w: np.ndarray) -> np.ndarray:
        if leaf in ("q", "k", "v"):
            return w.reshape(c.d_model, -1).T
        if leaf == "o":
            return w.reshape(-1, c.d_model).T
        if leaf == "scale":
            return w
        return w.T

    out = {
        "model.embed_tokens.weight": host(p["embed"]["embedding"]),
        "model.norm.weight": host(p["final_norm"]["scale"]),
    }
    for i in range(c.n_layers):
        block = p[f"block_{i}"]
        for (module, leaf), hf_name in _BLOCK_LEAVES:
            out[f"model.layers.{i}.{hf_name}"] = host(torch_layout(leaf, host(block[module][leaf])))
    if not c.tie_embeddings:
        out["lm_head.weight"] = host(host(p["lm_head"]).T)
    kernel, bias = host(p["reward_head"]["kernel"]), host(p["reward_head"]["bias"])
    if head == "reward" or np.any(kernel) or np.any(bias):
        out["score.weight"] = host(kernel.T)
        out["score.bias"] = bias
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- files


def _weight_files(directory: Path) -> list[Path]:
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise UserError(f"{index}: not a safetensors index ({e})") from None
        files = [directory / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{directory}: shards listed in {INDEX_FILE} are missing: {missing}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in directory.glob("*.bin"))
        hint = (
            f" (found PyTorch pickles {bins[:2]}: convert them to safetensors first, e.g. "
            "`model.save_pretrained(dir, safe_serialization=True)`)"
            if bins
            else ""
        )
        raise UserError(f"{directory}: no *.safetensors files{hint}")
    return files


class LazyTensors(Mapping):
    """Tensors of a (sharded) safetensors checkpoint by name. Values are `LazyTensor`s whose
    shape is known at once and whose data is read only when converted with `np.asarray`, so a
    large model is not held twice in host memory while it is converted."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self._where: dict[str, Any] = {}
        for f in files:
            try:
                handle = safe_open(str(f), framework="numpy")
            except Exception as e:  # the Rust side raises plain exceptions
                raise UserError(f"{f}: not a readable safetensors file: {e}") from None
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                self._where[name] = handle

    def __getitem__(self, name: str) -> LazyTensor:
        return LazyTensor(self._where[name], name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


class LazyTensor:
    def __init__(self, handle: Any, name: str):
        self.handle, self.name = handle, name
        self.shape = tuple(handle.get_slice(name).get_shape())

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        x = self.handle.get_tensor(self.name)
        return x if dtype is None else x.astype(dtype)


def read_hf_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{directory}: no {CONFIG_FILE} (expected a Hugging Face model directory)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None


def read_hf_dir(
    directory: str | os.PathLike, *, param_dtype: str = "float32"
) -> tuple[tm.TransformerConfig, PyTree]:
    """Config and parameters of an HF Llama/Gemma directory (`config.json` + safetensors)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"hf:{directory}: not a directory")
    config = config_from_hf(read_hf_config(directory), param_dtype=param_dtype)
    tensors = LazyTensors(_weight_files(directory))
    return config, params_from_hf(tensors, config)


def write_hf_dir(
    directory: str | os.PathLike,
    params: PyTree,
    config: tm.TransformerConfig,
    *,
    head: str = "causal-lm",
    tokenizer: Any | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> list[Path]:
    """Writes `config.json`, the safetensors (sharded past `max_shard_bytes`, with the index
    HF expects) and, if given, the tokenizer (`tokenizer.json`, `tokenizer_config.json`)."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors_from(params, config, head=head)
    dtypes = {str(x.dtype) for x in tensors.values()}
    torch_dtype = dtypes.pop() if len(dtypes) == 1 else "float32"
    ids = {}
    if tokenizer is not None:
        ids = {"bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id}
        tokenizer.save(directory)
    hf_config = hf_config_from(config, head=head, torch_dtype=torch_dtype, **ids)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, x in tensors.items():
        if size and size + x.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = x
        size += x.nbytes
    for old in [*directory.glob("*.safetensors"), directory / INDEX_FILE]:
        old.unlink(missing_ok=True)  # a stale shard would be read back with the new ones
    written = []
    meta = {"format": "pt"}  # what transformers checks before loading a safetensors file
    if len(shards) == 1:
        save_file(shards[0], str(directory / WEIGHTS_FILE), metadata=meta)
        written.append(directory / WEIGHTS_FILE)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / name), metadata=meta)
            weight_map.update(dict.fromkeys(shard, name))
            written.append(directory / name)
        total = sum(x.nbytes for x in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (directory / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
    return written
