"""PyTorch peer of `run.py sampling`: transformers' `LlamaForCausalLM.generate` (KV cache,
greedy, a fixed number of new tokens: no EOS id) on the HF export of our weights and the same
prompts (full-length rows, no padding)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _proto
import _torch_common
import numpy as np
import torch

STATE: dict = {}


def setup(model_dir: str, prompts: str) -> dict:
    from transformers import LlamaForCausalLM

    t = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=_torch_common.DTYPE)
    model = model.to(_torch_common.DEVICE).eval()
    # No EOS: every row generates exactly max_new_tokens.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    tokens = torch.from_numpy(np.load(prompts).astype(np.int64))
    STATE.update(model=model, prompts=tokens.to(_torch_common.DEVICE))
    return {
        "load_seconds": time.perf_counter() - t,
        "attn_implementation": model.config._attn_implementation,
    }


def _generate(batch: int, new_tokens: int) -> torch.Tensor:
    prompts = STATE["prompts"][:batch]
    with torch.inference_mode():
        out = STATE["model"].generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            eos_token_id=None,
            pad_token_id=0,
        )
    if out.shape != (batch, prompts.shape[1] + new_tokens):
        raise RuntimeError(f"generate returned {tuple(out.shape)}")
    return out[:, prompts.shape[1] :]


def warmup(batch: int, new_tokens: int) -> dict:
    t = time.perf_counter()
    tokens = _generate(batch, new_tokens)
    _torch_common.sync()
    return {"seconds": time.perf_counter() - t, "tokens": tokens.tolist()}


def run(batch: int, new_tokens: int, calls: int = 1) -> dict:
    t = time.perf_counter()
    for _ in range(calls):
        _generate(batch, new_tokens)
    _torch_common.sync()
    dt = time.perf_counter() - t
    return {"seconds": dt, "calls": calls, "value": calls * batch * new_tokens / dt}


if __name__ == "__main__":
    _proto.serve({**_torch_common.HANDLERS, "setup": setup, "warmup": warmup, "run": run})
