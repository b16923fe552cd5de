"""What every PyTorch peer answers besides its own benchmark: its environment, the dense-matmul
rate and the memory bandwidth, measured the same way as `benchmarks/common.py` does in JAX."""

from __future__ import annotations

import importlib.metadata as md
import os
import time

import torch

# `run.py --peer-threads N`: torch's intra-op threads (default: one per core).
if os.environ.get("BENCH_TORCH_THREADS"):
    torch.set_num_threads(int(os.environ["BENCH_TORCH_THREADS"]))
# `run.py --peer-device` and `--dtype`: where the peer's models and data live, and their dtype.
DEVICE = torch.device(os.environ.get("BENCH_TORCH_DEVICE", "cpu"))
DTYPE = getattr(torch, os.environ.get("BENCH_DTYPE", "float32"))


def sync() -> None:
    """Waits for the device's queued work: CUDA calls return before their kernels finish, so
    every timer reads the clock after this."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def env() -> dict:
    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "missing"

    return {
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "numpy": version("numpy"),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "device": str(DEVICE),
        "device_name": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu",
        "dtype": str(DTYPE).removeprefix("torch."),
    }


def matmul(n: int = 2048, reps: int = 3, dtype: str = "float32") -> dict:
    """[n, n] @ [n, n] in `dtype`: 2n³ FLOPs per product; one repeat = `reps` products."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(DEVICE, getattr(torch, dtype))
    b = torch.randn(n, n, generator=g).to(DEVICE, getattr(torch, dtype))
    c = torch.empty(n, n, dtype=a.dtype, device=DEVICE)
    torch.matmul(a, b, out=c)
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b, out=c)
    sync()
    dt = time.perf_counter() - t
    return {"value": 2.0 * n**3 * reps / dt / 1e9, "seconds": dt, "n": n, "products": reps}


def bandwidth(mib: int = 256, reps: int = 3) -> dict:
    """Read + write bandwidth of an in-place `x += 1` over `mib` MiB, GB/s."""
    x = torch.zeros(mib * 2**20 // 4, device=DEVICE)
    x.add_(1.0)
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        x.add_(1.0)
    sync()
    dt = time.perf_counter() - t
    return {"value": 2.0 * x.numel() * 4 * reps / dt / 1e9, "seconds": dt, "mib": mib}


HANDLERS = {"env": env, "matmul": matmul, "bandwidth": bandwidth}
