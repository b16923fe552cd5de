"""PyTorch peer of `run.py rm_train`: transformers' `LlamaForSequenceClassification` trained with
the Bradley–Terry loss in a plain loop (forward on chosen + rejected rows as one batch,
-log σ(r⁺ - r⁻), backward, global-norm clipping, AdamW), the weights read from the HF export of
our initial parameters and the batches from the same `.npz` our side reads."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _proto
import _torch_common
import numpy as np
import torch
import torch.nn.functional as F

STATE: dict = {}


def setup(
    model_dir: str,
    data: str,
    learning_rate: float,
    betas: list[float],
    eps: float,
    clip_norm: float,
    fused: bool,
    warmup_steps: int,
) -> dict:
    from transformers import LlamaForSequenceClassification

    t = time.perf_counter()
    # pad_token_id: how the head finds each row's last real token; no row holds token 0.
    model = LlamaForSequenceClassification.from_pretrained(
        model_dir, dtype=_torch_common.DTYPE, pad_token_id=0
    ).to(_torch_common.DEVICE)
    model.train()
    arrays = np.load(data)
    chosen = torch.from_numpy(arrays["chosen"].astype(np.int64)).to(_torch_common.DEVICE)
    rejected = torch.from_numpy(arrays["rejected"].astype(np.int64)).to(_torch_common.DEVICE)
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=learning_rate,
        betas=tuple(betas),
        eps=eps,
        weight_decay=0.0,
        fused=fused,
    )
    STATE.update(model=model, opt=opt, chosen=chosen, rejected=rejected, clip=clip_norm, i=0)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    losses = [_step() for _ in range(warmup_steps)]
    return {
        "load_seconds": load_s,
        "warmup_seconds": time.perf_counter() - t,
        "warmup_losses": losses,
        "attn_implementation": model.config._attn_implementation,
        "n_params": sum(p.numel() for p in model.parameters()),
    }


def _step() -> float:
    s = STATE
    b = s["i"] % s["chosen"].shape[0]
    s["i"] += 1
    chosen, rejected = s["chosen"][b], s["rejected"][b]
    n = chosen.shape[0]
    r = s["model"](input_ids=torch.cat([chosen, rejected])).logits[:, 0].float()
    loss = F.softplus(-(r[:n] - r[n:])).mean()
    s["opt"].zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(s["model"].parameters(), s["clip"])
    s["opt"].step()
    return float(loss.item())


def run(steps: int) -> dict:
    pairs = STATE["chosen"].shape[1]
    times, losses = [], []
    t0 = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        losses.append(_step())  # reads the loss back: the device has finished the step
        times.append(time.perf_counter() - t)
    dt = time.perf_counter() - t0
    return {
        "seconds": dt,
        "steps": steps,
        "value": steps * pairs / dt,
        "step_seconds": times,
        "losses": losses,
    }


if __name__ == "__main__":
    _proto.serve({**_torch_common.HANDLERS, "setup": setup, "run": run})
