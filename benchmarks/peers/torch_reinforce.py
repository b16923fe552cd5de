"""PyTorch peer of `run.py reinforce`: one KL-regularised REINFORCE step written like
`warm_jax.policy.reinforce.make_loss_fn` + `loop.make_train_step` (anchor='ema', RLOO):

1. k samples per prompt with transformers' `generate` (KV cache, temperature T, no top-k/top-p,
   no EOS: exactly N new tokens);
2. log π_θ of the responses by teacher forcing under gradient (and the entropy, for the
   metrics), log π_anchor and log π_sft without gradient, the reward model's score at the last
   token (`LlamaForSequenceClassification`'s backbone + score head);
3. r_β = r - β Σ_t (log π_θ - log π_anchor), RLOO advantages, loss -mean(A Σ_t log π_θ);
4. backward, global-norm clipping, AdamW, and the EMA anchor θ_a ← (1-μ) θ_a + μ θ.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _proto
import _torch_common
import numpy as np
import torch

STATE: dict = {}


def setup(
    policy_dir: str,
    rm_dir: str,
    prompts: str,
    samples: int,
    new_tokens: int,
    temperature: float,
    beta: float,
    mu: float,
    learning_rate: float,
    betas: list[float],
    eps: float,
    clip_norm: float,
    fused: bool,
    warmup_steps: int,
    seed: int,
) -> dict:
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(seed)
    t = time.perf_counter()
    dev, dtype = _torch_common.DEVICE, _torch_common.DTYPE
    policy = LlamaForCausalLM.from_pretrained(policy_dir, dtype=dtype).to(dev)
    policy.train()
    policy.generation_config.eos_token_id = None
    policy.generation_config.pad_token_id = 0
    anchor = copy.deepcopy(policy).eval().requires_grad_(False)
    sft = copy.deepcopy(policy).eval().requires_grad_(False)
    rm = LlamaForSequenceClassification.from_pretrained(rm_dir, dtype=dtype).to(dev)
    rm.eval().requires_grad_(False)
    opt = torch.optim.AdamW(
        policy.parameters(),
        lr=learning_rate,
        betas=tuple(betas),
        eps=eps,
        weight_decay=0.0,
        fused=fused,
    )
    STATE.update(
        policy=policy,
        anchor=anchor,
        sft=sft,
        rm=rm,
        opt=opt,
        prompts=torch.from_numpy(np.load(prompts).astype(np.int64)).to(dev),
        k=samples,
        n=new_tokens,
        temp=temperature,
        beta=beta,
        mu=mu,
        clip=clip_norm,
        i=0,
    )
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    metrics = [_step() for _ in range(warmup_steps)]
    return {
        "load_seconds": load_s,
        "warmup_seconds": time.perf_counter() - t,
        "warmup_metrics": metrics,
        "attn_implementation": policy.config._attn_implementation,
    }


def _token_logprobs(model, seq: torch.Tensor, n: int, temp: float, entropy: bool = False):
    """log π_T of the last `n` tokens of `seq` (the response), [B, n], and their entropies:
    logits only at the slots that predict them (`logits_to_keep`), as ours projects only those."""
    logits = model(input_ids=seq, logits_to_keep=n + 1).logits[:, :-1].float() / temp
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, seq[:, -n:, None])[..., 0] - logz
    if not entropy:
        return logp, None
    with torch.no_grad():
        probs = torch.exp(logits - logz[..., None])
        ent = logz - (probs * logits).sum(-1)
    return logp, ent


def _step() -> dict:
    s = STATE
    b = s["i"] % s["prompts"].shape[0]
    s["i"] += 1
    k, n, temp = s["k"], s["n"], s["temp"]
    prompt = s["prompts"][b].repeat_interleave(k, dim=0)
    plen = prompt.shape[1]
    with torch.no_grad():
        seq = s["policy"].generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=True,
            temperature=temp,
            top_k=0,
            top_p=1.0,
            max_new_tokens=n,
            use_cache=True,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert seq.shape[1] == plen + n  # no EOS: every response token is scored

    logp, ent = _token_logprobs(s["policy"], seq, n, temp, entropy=True)
    with torch.no_grad():
        logp_anchor, _ = _token_logprobs(s["anchor"], seq, n, temp)
        logp_sft, _ = _token_logprobs(s["sft"], seq, n, temp)
        hidden = s["rm"].model(input_ids=seq).last_hidden_state[:, -1]
        r = s["rm"].score(hidden)[:, 0].float()
        logp_c = logp.detach()
        kl_anchor = (logp_c - logp_anchor).sum(-1)
        kl_sft = (logp_c - logp_sft).sum(-1)
        r_beta = r - s["beta"] * kl_anchor
        grouped = r_beta.view(-1, k)
        adv = (grouped - (grouped.sum(-1, keepdim=True) - grouped) / (k - 1)).view(-1)
    loss = -(adv * logp.sum(-1)).mean()
    s["opt"].zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(s["policy"].parameters(), s["clip"])
    s["opt"].step()
    with torch.no_grad():
        anchor_params = list(s["anchor"].parameters())
        torch._foreach_lerp_(anchor_params, list(s["policy"].parameters()), s["mu"])
    return {
        "loss": float(loss.item()),
        "reward": float(r.mean()),
        "kl_anchor": float(kl_anchor.mean()),
        "kl_sft": float(kl_sft.mean()),
        "entropy": float(ent.mean()),
        "grad_norm": float(grad_norm),
    }


def run(steps: int) -> dict:
    t = time.perf_counter()
    metrics = [_step() for _ in range(steps)]  # each step reads its metrics back
    dt = time.perf_counter() - t
    return {"seconds": dt, "steps": steps, "value": steps / dt, "metrics": metrics}


if __name__ == "__main__":
    _proto.serve({**_torch_common.HANDLERS, "setup": setup, "run": run})
