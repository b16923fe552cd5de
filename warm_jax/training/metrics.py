"""Where training metrics go: a progress bar, `metrics.jsonl`, TensorBoard (if installed) and a
loss-curve PNG. Resuming truncates the JSON-lines history at the restored step so that the file
always reads as one uninterrupted run."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _plain(v):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    rows = []
    for line in p.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a crash ends the readable history
    return rows


class MetricsWriter:
    """Only one process of a multi-process run writes (`enabled`); the others' calls are no-ops."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        start_step: int = 0,
        tensorboard: bool = True,
        enabled: bool = True,
    ):
        self.enabled = enabled
        self.workdir = Path(workdir)
        self._file = self._tb = None
        if not enabled:
            return
        self.path = self.workdir / "metrics.jsonl"
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= start_step]
        self.workdir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")  # noqa: SIM115 - kept open for the run
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
            except ImportError:
                self._tb = None

    def write(self, step: int, metrics: Mapping) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def plot_curves(
    jsonl: str | os.PathLike,
    out_png: str | os.PathLike,
    keys: Sequence[str] = ("loss", "eval/loss"),
    title: str = "",
) -> Path | None:
    """Writes a PNG of the given metrics against step; returns None if none were logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(jsonl)
    series = {k: [(r["step"], r[k]) for r in rows if k in r] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, pts in series.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, label=k, marker="o" if len(xs) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("value")
    ax.set_title(title or Path(jsonl).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out_png)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out)
    return out
