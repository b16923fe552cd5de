"""The results tables of BENCHMARKS.md, from `benchmarks/results/*.json`:

    .venv/bin/python benchmarks/report.py > /tmp/table.md
    .venv/bin/python benchmarks/report.py --plot benchmarks/speedups.png

`--plot` also draws every ratio that has a target, against both peers, on one chart.
`--results DIR` reads another directory of results (e.g. a run on another host).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ORDER = ("matmul_peak", "rm_train", "members", "sampling", "reinforce")


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "—"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def load(name: str, suffix: str = "", prefix: str = "") -> dict | None:
    p = RESULTS / f"{prefix}{name}{suffix}.json"
    return json.loads(p.read_text()) if p.exists() else None


def notes(name: str, c: dict) -> str:
    out = []
    env = c.get("environment", {})
    on_cpu = env.get("jax_backend", "cpu") == "cpu"
    dtype = (c.get("workload") or {}).get("dtype")
    if dtype and dtype != "float32":
        out.append(dtype)
    f = c.get("flops")
    if f and "peak_gflops" in f:
        out.append(
            f"ours {f['ours_gflops']:.1f} / peer {f['peer_gflops']:.1f} GFLOP/s = "
            f"{100 * f['ours_peak_fraction']:.0f}% / {100 * f['peer_peak_fraction']:.0f}% of "
            f"peak {f['peak_gflops']:.0f}"
        )
        if c.get("target") and c["speedup"] < c["target"]:
            # The peer's FLOPs are the same work, so the target is a rate: where it lies.
            out.append(f"target needs {100 * c['target'] * f['peer_peak_fraction']:.0f}% of peak")
    if name == "rm_train":
        out.append(f"first-step loss diff {c['first_step_loss_diff']:.1e}")
        out.append(f"compile {c['ours']['compile_seconds']:.0f} s")
    elif name == "members":
        ms = c["ms_per_member_step"]
        out.append(f"{ms['vmapped']:.0f} vs {ms['sequential']:.0f} ms/member-step")
    elif name == "sampling":
        g = c["greedy_agreement"]
        out.append(f"greedy tokens equal {100 * g['fraction_equal_tokens']:.0f}%")
        if "bound_fraction" in c:
            bb = c["bandwidth_bound"]
            out.append(
                f"{'DRAM' if on_cpu else 'HBM'} bound {bb['bound_tokens_per_s']:.0f} tok/s "
                f"({100 * c['bound_fraction']:.0f}% reached)"
            )
            if c.get("target") and c["speedup"] < c["target"]:
                need = c["target"] * c["bound_fraction"] / c["speedup"]
                out.append(f"target needs {100 * need:.0f}% of that bound")
        out.append(f"compile {c['ours']['compile_seconds']:.0f} s")
    elif name == "reinforce":
        ms = c["ms_per_step"]
        out.append(f"{ms['ours']:.0f} vs {ms['peer']:.0f} ms/step")
        out.append(f"compile {c['ours']['compile_seconds']:.0f} s")
    elif name == "matmul_peak":
        bw = c["bandwidth"]
        out.append(
            f"bandwidth jax {bw['jax']['median']:.1f} / torch {bw['torch']['median']:.1f} GB/s"
        )
        variants = c.get("variants", {})
        rates = [f"{k} {v['median']:.0f}" for k, v in variants.items() if isinstance(v, dict)]
        if rates:
            out.append("GFLOP/s " + ", ".join(rates))
    cpu = env.get("cpu", "")
    if cpu or c.get("finished_at"):
        host = next((name for name in ("EPYC", "Xeon") if name in cpu), cpu or "?")
        if not on_cpu:
            host = env.get("peer", {}).get("device_name") or env.get("device", "?")
        out.append(f"{host}, {c.get('finished_at', '?')[:10]}")
    return "; ".join(out)


def met(c: dict) -> str:
    def word(ok: bool) -> str:
        return "met" if ok else "**missed**"

    if c.get("met") is None:
        return "—"
    if "peak_fraction_target" in c:
        return (
            f"{word(c['speedup'] >= c['target'])} / peak "
            f"{word(c['peak_fraction'] >= c['peak_fraction_target'])}"
        )
    return word(c["met"])


def target(name: str, c: dict) -> str:
    t = c.get("target")
    if t is None:
        return "—"
    s = f"≥ {t:g}x"
    if "peak_fraction_target" in c:
        s += f" and ≥ {100 * c['peak_fraction_target']:.0f}% peak"
    return s


def rows(suffix: str = "", merge: bool = True, prefix: str = "") -> list[str]:
    out = [
        "| comparison | case | ours | peer | unit | ours/peer | target | met? | load 1-min "
        "(start→end) | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ORDER:
        d = load(name, suffix, prefix)
        if d is None:
            continue
        for c in d["cases"]:
            case = c["case"].split("/", 1)[-1]
            ld = c["load"]
            out.append(
                f"| {name} | {case} | {fmt(c['ours']['median'])} | {fmt(c['peer']['median'])} "
                f"| {c['ours']['unit']} | {c['speedup']:.2f}x | {target(name, c)} | {met(c)} "
                f"| {ld['start'][0]:.1f}→{ld['end'][0]:.1f} | {notes(name, c)} |"
            )
    m = (load("merge") or load("merge_bench")) if merge else None
    if m is not None:
        for r in m["summary"]:
            out.append(
                f"| merge | {r['method']} M={r['M']} | {fmt(r['warm_jax_seconds_median'])} "
                f"| {fmt(r['mergekit_seconds_median'])} | s (lower is better) "
                f"| {r['speedup_vs_mergekit']:.2f}x | {merge_target(r)} "
                f"| {merge_load(m, r)} | peak RSS "
                f"{r['warm_jax_max_rss_mib_median']:.0f} vs "
                f"{r['mergekit_max_rss_mib_median']:.0f} MiB; speedup = mergekit/ours; "
                f"CPU s {fmt(r['warm_jax_cpu_seconds_median'])} vs "
                f"{fmt(r['mergekit_cpu_seconds_median'])} |"
            )
    return out


MERGE_TARGET = {"average": 2.0}  # warm-jax merge --method average vs mergekit linear


def merge_met(r: dict) -> bool:
    """Whether a merge row with a target (a method in MERGE_TARGET) meets it."""
    return r["speedup_vs_mergekit"] >= MERGE_TARGET[r["method"]]


def merge_target(r: dict) -> str:
    t = MERGE_TARGET.get(r["method"])
    if t is None:
        return "— | —"
    return f"≥ {t:g}x | {'met' if merge_met(r) else '**missed**'}"


def merge_load(m: dict, r: dict) -> str:
    """Median 1-minute load before → after the runs of this row (recorded since the runs
    carry it)."""
    sel = [x for x in m["runs"] if x["method"] == r["method"] and x["M"] == r["M"]]
    if not sel or "loadavg_1min_before" not in sel[0]:
        return "—"
    before = statistics.median(x["loadavg_1min_before"] for x in sel)
    after = statistics.median(x["loadavg_1min_after"] for x in sel)
    return f"{before:.1f}→{after:.1f}"


def commands(suffix: str = "", prefix: str = "") -> list[str]:
    out = []
    for name in ORDER:
        d = load(name, suffix, prefix)
        if d is None:
            continue
        seen = []
        for c in d["cases"]:
            if c["command"] not in seen:
                seen.append(c["command"])
        out += [f"    {cmd}" for cmd in seen]
    return out


def targeted(suffix: str = "", merge: bool = True) -> list[dict]:
    """Every measured ratio that has a target: {label, speedup, target, met}, in table order
    (`met` also holds rm_train's peak-fraction target, where it has one)."""
    out = []
    for name in ORDER:
        d = load(name, suffix)
        for c in (d or {}).get("cases", []):
            if c.get("target") is not None:
                label = c["case"] + (" (vmapped / sequential)" if name == "members" else "")
                out.append(
                    {
                        "label": label,
                        "speedup": c["speedup"],
                        "target": c["target"],
                        "met": bool(c["met"]),
                    }
                )
    m = (load("merge") or load("merge_bench")) if merge else None
    for r in (m or {}).get("summary", []):
        if r["method"] in MERGE_TARGET:
            out.append(
                {
                    "label": f"merge/{r['method']}/M{r['M']} (vs mergekit)",
                    "speedup": r["speedup_vs_mergekit"],
                    "target": MERGE_TARGET[r["method"]],
                    "met": merge_met(r),
                }
            )
    return out


def plot(path: Path) -> None:
    """One horizontal bar per targeted ratio and peer setting, log scale, target ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {
        "peer: torch, 2 threads": targeted(),
        "peer: torch, 1 thread": targeted("_peer_threads1", merge=False),
    }
    labels = [r["label"] for r in series["peer: torch, 2 threads"]]
    for rows_ in series.values():
        labels += [r["label"] for r in rows_ if r["label"] not in labels]
    if not labels:
        raise SystemExit(f"no results with targets under {RESULTS}")
    fig, ax = plt.subplots(figsize=(9, 0.38 * len(labels) + 1.2))
    height = 0.38
    for k, (legend, rows_) in enumerate(series.items()):
        by = {r["label"]: r for r in rows_}
        ys = [i + (k - 0.5) * height for i, lab in enumerate(labels) if lab in by]
        xs = [by[lab]["speedup"] for lab in labels if lab in by]
        colours = ["tab:green" if by[lab]["met"] else "tab:red" for lab in labels if lab in by]
        ax.barh(
            ys,
            xs,
            height=height,
            color=colours,
            alpha=1.0 if k == 0 else 0.45,
            edgecolor="black",
            linewidth=0.4,
            label=legend,
        )
    target = {r["label"]: r["target"] for rows_ in series.values() for r in rows_}
    for i, lab in enumerate(labels):
        ax.plot([target[lab]] * 2, [i - 0.45, i + 0.45], color="black", linewidth=1.5)
    ax.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    ticks = [0.5, 1, 2, 5, 10, 20]
    ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("ours / peer (higher = warm_jax faster; black tick = target)")
    ax.set_title(
        "green: target met, red: missed; solid: peer torch on 2 threads\n"
        "(mergekit for merges, sequential members for vmapped), faded: torch on 1 thread",
        fontsize=9,
    )
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def main() -> int:
    global RESULTS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS, help="directory of NAME.json results")
    p.add_argument("--plot", type=Path, default=None, help="also write the ratios chart (PNG)")
    args = p.parse_args()
    if not args.results.is_dir():
        p.error(f"--results {args.results}: not a directory")
    RESULTS = args.results
    print("\n".join(rows()))
    print()
    print("\n".join(commands()))
    if any(load(name, "_peer_threads1") for name in ORDER):
        print("\n## peer with --peer-threads 1\n")
        print("\n".join(rows("_peer_threads1", merge=False)))
        print()
        print("\n".join(commands("_peer_threads1")))
    # benchmarks/accelerator.sh writes DEVICE_NAME.json (item 6 of the issue).
    for device in sorted({p.name.split("_", 1)[0] for p in RESULTS.glob("cuda_*.json")}):
        print(f"\n## on {device} (benchmarks/accelerator.sh)\n")
        print("\n".join(rows(merge=False, prefix=f"{device}_")))
    if args.plot is not None:
        plot(args.plot)
        print(f"\nwrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
