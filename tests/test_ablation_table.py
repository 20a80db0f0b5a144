"""benchmarks/ablation_digits.py: the JSON record, the paired summary and the tables, on synthetic metrics."""
from __future__ import annotations

import pytest

from _bench import load_benchmark


@pytest.fixture(scope="module")
def abl():
    return load_benchmark("ablation_digits")


def _metrics(miou: float, levels=None) -> dict:
    m = {"target_miou": miou, "source_only_miou": 10.0, "segmenter_updates": 1400, "wall_s": 1.0, "other": "dropped"}
    if levels:
        m["levels"] = [{"level": n, "frechet_to_target": ft, "frechet_to_source": fs, "consistency_miou": 40.0,
                        "target_miou": miou, "seconds": 5.0, "loss": 0.3} for n, ft, fs in levels]
    return m


def test_summary_pairs_by_seed_and_tables_show_the_levels(abl):
    lv = [(500, 50.0, 30.0), (1000, 30.0, 90.0)]
    results = {
        "digits_source_only": {"runs": [abl.run_record(0, _metrics(15.0)), abl.run_record(1, _metrics(17.0))]},
        "digits_ablation_wo_sgg": {"runs": [abl.run_record(0, _metrics(16.0, lv))]},
        "digits_ptl": {"runs": [abl.run_record(0, _metrics(18.0, lv)), abl.run_record(1, _metrics(21.0, lv))]},
        "digits_oracle": {"runs": [abl.run_record(0, _metrics(45.0))]},
    }
    rec = results["digits_ptl"]["runs"][0]
    assert "other" not in rec and rec["levels"][1] == {"level": 1000, "frechet_to_target": 30.0,
                                                       "frechet_to_source": 90.0, "consistency_miou": 40.0,
                                                       "target_miou": 18.0, "seconds": 5.0}
    s = abl.summary(results)
    assert s["full_minus_source_only"] == [3.0, 4.0]  # paired by seed, not mean minus mean of other seeds
    assert s["full_minus_wo_sgg"] == [2.0]
    assert s["gap_closed"] == pytest.approx((19.5 - 16.0) / (45.0 - 16.0))
    t = abl.table(results)
    assert "| full (PTL + SGG, alternate) | 19.5 ± 2.1 | 2 | 1400 | - |" in t
    # every variant beside full PTL on the seeds both ran
    assert "| source-only | 16.0 ± 1.4 | 2 | 1400 | 3.5 ± 0.7 (+3.0, +4.0; seeds 0, 1) |" in t
    assert "| w/o SGG (PTL unguided) | 16.0 (1 run) | 1 | 1400 | +2.0 (seed 0 only) |" in t
    assert "| full (PTL + SGG, alternate) | 1000 | 30.0 ± 0.0 | 90.0 ± 0.0 | 40.0 ± 0.0 | 19.5 ± 2.1 |" in t
    assert "| w/o SGG (PTL unguided) | 500 | 50.0 (1 run) | 30.0 (1 run) |" in t  # one run: no "± 0.0"
    assert "w/o PTL" not in t  # not run: no row, no paired line
    assert "gap closed by full PTL: 12 % against the mean oracle; oracle runs by seed: 45.0 (seed 0)." in t
    assert "best oracle run" not in t  # one oracle run: the mean is the best
    # a stalled oracle run (all background) pulls the mean down: the best run is reported too
    results["digits_oracle"]["runs"].append(abl.run_record(1, _metrics(13.0)))
    s = abl.summary(results)
    assert s["oracle_by_seed"] == {0: 45.0, 1: 13.0}
    assert s["gap_closed"] == pytest.approx((19.5 - 16.0) / (29.0 - 16.0))
    assert s["gap_closed_best_oracle"] == pytest.approx((19.5 - 16.0) / (45.0 - 16.0))
    assert "Against the best oracle run (45.0): 12 %." in abl.table(results)


def test_the_papers_ordering_is_paired_by_seed(abl):
    results = {
        "digits_source_only": {"runs": [abl.run_record(k, _metrics(v)) for k, v in ((0, 15.0), (1, 17.0), (2, 16.0))]},
        "digits_baseline": {"runs": [abl.run_record(k, _metrics(v)) for k, v in ((0, 18.0), (1, 16.0))]},
        "digits_ablation_wo_ptl": {"runs": [abl.run_record(k, _metrics(v)) for k, v in ((0, 21.0), (1, 20.0), (2, 30.0))]},
        "digits_ptl": {"runs": [abl.run_record(k, _metrics(v)) for k, v in ((0, 20.0), (1, 24.0), (2, 25.0))]},
    }
    s = abl.summary(results)
    assert s["full_minus_wo_ptl"] == [-1.0, 4.0, -5.0]
    assert s["wo_ptl_minus_baseline"] == [3.0, 4.0]  # seed 2 has no baseline run: left out, not paired across seeds
    assert s["baseline_minus_source_only"] == [3.0, -1.0]
    t = abl.table(results)
    assert "Full PTL minus w/o PTL (one level n = N, SGG with g_0), paired by seed: -0.7 ± 4.5 (-1.0, +4.0, -5.0)." in t
    assert "W/o PTL minus the baseline (phi^N, no SGG), paired by seed: 3.5 ± 0.7 (+3.0, +4.0)." in t
    assert "| baseline (phi^N, no SGG) | 17.0 ± 1.4 | 2 | 1400 | 5.0 ± 4.2 (+2.0, +8.0; seeds 0, 1) |" in t


def test_write_docs_puts_the_summary_in_the_readme_and_the_levels_in_the_measurements(abl, tmp_path):
    lv = [(1000, 30.0, 90.0)]
    results = {"digits_source_only": {"runs": [abl.run_record(0, _metrics(15.0))]},
               "digits_ptl": {"runs": [abl.run_record(0, _metrics(18.0, lv))]}}
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("intro\n<!-- ablation-summary:begin -->\nold\n<!-- ablation-summary:end -->\nafter\n")
    (tmp_path / "docs" / "measurements.md").write_text("x\n<!-- ablation:begin -->\nold\n<!-- ablation:end -->\ny\n")
    abl.write_docs(results, root=tmp_path)
    readme = (tmp_path / "README.md").read_text()
    docs = (tmp_path / "docs" / "measurements.md").read_text()
    assert readme.startswith("intro\n<!-- ablation-summary:begin -->\n| variant |") and readme.endswith("end -->\nafter\n")
    assert "old" not in readme and "old" not in docs
    assert "| full (PTL + SGG, alternate) | 18.0 (1 run) |" in readme and "| full (PTL + SGG, alternate) | 1000 |" not in readme
    assert "| full (PTL + SGG, alternate) | 1000 | 30.0 (1 run) |" in docs and docs.endswith("end -->\ny\n")
    # a file without its markers is an error naming it, not a table silently left out
    (tmp_path / "README.md").write_text("no markers\n")
    with pytest.raises(ValueError, match="README.md: markers <!-- ablation-summary:begin -->"):
        abl.write_docs(results, root=tmp_path)


def test_the_tables_in_the_docs_are_the_ones_the_json_gives(abl):
    # README.md and docs/measurements.md show bench_out/ablation_digits.json as --write-docs renders it
    # (edit the JSON's runs, never the tables by hand)
    import json

    results = json.loads((abl.ROOT / "bench_out" / "ablation_digits.json").read_text())["results"]
    for rel, marker, levels in abl.DOC_TABLES:
        text = (abl.ROOT / rel).read_text()
        block = text.split(f"<!-- {marker}:begin -->\n", 1)[1].split(f"\n<!-- {marker}:end -->", 1)[0]
        assert block == abl.table(results, levels=levels), rel
