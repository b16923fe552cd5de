"""benchmarks/report.py: the ratios it charts are the ones the results files hold."""

import json

import matplotlib.image
import pytest

from benchmarks import report


def case(name: str, speedup: float, target, met) -> dict:
    return {"case": name, "speedup": speedup, "target": target, "met": met}


@pytest.fixture
def results(tmp_path, monkeypatch):
    def write(name: str, cases: list[dict]) -> None:
        (tmp_path / f"{name}.json").write_text(json.dumps({"cases": cases}))

    # rm_train's 135M row: ratio above its 1.0x target, peak-fraction target missed.
    write(
        "rm_train", [case("rm_train/tiny", 0.55, 2.0, False), case("rm_train/m", 1.07, 1.0, False)]
    )
    write("rm_train_peer_threads1", [case("rm_train/tiny", 2.5, 2.0, True)])
    write(
        "members",
        [case("members/tiny/M2", 1.01, 1.5, False), case("members/small/M2", 1.1, None, None)],
    )
    summary = [
        {"method": "average", "M": 2, "speedup_vs_mergekit": 3.08},
        {"method": "slerp", "M": 2, "speedup_vs_mergekit": 2.59},  # no target: not charted
    ]
    (tmp_path / "merge_bench.json").write_text(json.dumps({"summary": summary}))
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    return tmp_path


def test_targeted_reads_every_ratio_with_a_target(results):
    assert report.targeted() == [
        {"label": "rm_train/tiny", "speedup": 0.55, "target": 2.0, "met": False},
        {"label": "rm_train/m", "speedup": 1.07, "target": 1.0, "met": False},
        {
            "label": "members/tiny/M2 (vmapped / sequential)",
            "speedup": 1.01,
            "target": 1.5,
            "met": False,
        },
        {"label": "merge/average/M2 (vs mergekit)", "speedup": 3.08, "target": 2.0, "met": True},
    ]
    assert report.targeted("_peer_threads1", merge=False) == [
        {"label": "rm_train/tiny", "speedup": 2.5, "target": 2.0, "met": True}
    ]


def test_plot_writes_one_png_and_no_temporary(results, tmp_path):
    out = tmp_path / "chart" / "speedups.png"
    out.parent.mkdir()
    report.plot(out)
    assert [p.name for p in out.parent.iterdir()] == ["speedups.png"]
    h, w = matplotlib.image.imread(out).shape[:2]
    # one row per charted label (4) sets the figure's height: 0.38 in each + 1.2 in, at 120 dpi
    assert (w, h) == (9 * 120, round((0.38 * 4 + 1.2) * 120))


def test_plot_refuses_an_empty_results_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    with pytest.raises(SystemExit, match="no results with targets"):
        report.plot(tmp_path / "x.png")
