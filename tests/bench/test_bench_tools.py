"""`make bench`'s own tools: the size knobs every bench reads, and the README table made from
.bench/results.json. The benches themselves are measurements, run by `make bench`, not here."""
from __future__ import annotations

import json

import pytest

from bench import readme, sizes
from bench.__main__ import parse

RESULTS = {
    "bench.extract": {"clipfleet_records_per_s": 12000, "cc2dataset_style_records_per_s": 8000,
                      "cc2dataset_style_no_lid_records_per_s": 20000, "extract_vs_cc2dataset_ratio": 1.5,
                      "extract_vs_cc2dataset_no_lid_ratio": 0.6, "bare_parse_records_per_s": 45000,
                      "_run": {"date": "2026-12-04 17:00 UTC", "cpu": "Test CPU", "cores": 2, "scale": 1.0,
                               "load_average_1m": 3.0, "command": "python -m bench bench.extract"}},
    "bench.polite": {"samples": 3000, "img2dataset_defaults_s": 24.0, "clipfleet_defaults_s": 12.0,
                     "ratio_img2dataset_time_over_clipfleet_time": 2.0, "large_samples": 20000,
                     "large_img2dataset_defaults_s": 86.5, "large_clipfleet_defaults_s": 27.7,
                     "ratio_large_img2dataset_time_over_clipfleet_time": 3.12, "capacity_per_s": 60.0,
                     "capacity_samples": 1200, "ratio_achieved_over_capacity": 0.92, "share_429": 0.008,
                     "robots_hosts": 10, "robots_requests_per_host": 1, "robots_s_per_host": 0.018,
                     "robots_run_s": 14.0, "ignore_robots_run_s": 14.9,
                     "_run": {"date": "2026-12-05 09:00 UTC", "cpu": "Test CPU", "cores": 2, "scale": 1.0,
                              "load_average_1m": 1.0, "command": "python -m bench"}},
}


def test_sizes_default_scale_and_own_variable(monkeypatch):
    for name in ("CLIPFLEET_BENCH_SCALE", "CLIPFLEET_BENCH_EXTRACT_SAMPLES", "CLIPFLEET_BENCH_POLITE_LARGE_SAMPLES"):
        monkeypatch.delenv(name, raising=False)
    assert sizes.size("EXTRACT_SAMPLES") == 120_000
    assert sizes.size("INDEX_VECTORS") == 200_000
    assert sizes.size("POLITE_LARGE_SAMPLES") == 20_000
    monkeypatch.setenv("CLIPFLEET_BENCH_SCALE", "0.1")
    assert sizes.size("EXTRACT_SAMPLES") == 12_000
    assert sizes.size("CLIP_SAMPLES") == 128          # never under its floor
    assert sizes.size("POLITE_LARGE_SAMPLES") == 0    # the large row is off in a quick check
    monkeypatch.setenv("CLIPFLEET_BENCH_EXTRACT_SAMPLES", "777")
    assert sizes.size("EXTRACT_SAMPLES") == 777       # its own variable wins over the scale


def test_repeats_are_capped_not_raised(monkeypatch):
    monkeypatch.delenv("CLIPFLEET_BENCH_REPEATS", raising=False)
    assert sizes.repeats(5) == 5
    monkeypatch.setenv("CLIPFLEET_BENCH_REPEATS", "1")
    assert sizes.repeats(5) == 1
    monkeypatch.setenv("CLIPFLEET_BENCH_REPEATS", "9")
    assert sizes.repeats(3) == 3


def test_unknown_bench_is_refused_with_the_list(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(["bench.extrakt"])
    assert exit_.value.code == 2
    assert "unknown bench bench.extrakt" in capsys.readouterr().err
    assert parse(["--scale", "0.05", "bench.index"]).scale == 0.05


def test_table_holds_each_ratio_machine_and_dates():
    text = readme.table(RESULTS)
    assert "Measured 2026-12-04 to 2026-12-05 on Test CPU, 2 cores;" in text
    assert "**1.50×** (goal ≥ 1.5)" in text                       # extract's ratio
    assert "24.0 s vs 12.0 s: **2.00×**" in text                  # whole process at 3000
    assert "86.5 s vs 27.7 s: **3.12×**" in text                  # and at 20 000
    assert "| index | – | not in .bench/results.json |" in text   # a bench not run says so
    assert "`python -m bench bench.extract`" in text
    assert "scale" not in text.splitlines()[0]                    # a full-size run says no scale


def test_quick_run_is_labelled_as_such():
    quick = json.loads(json.dumps(RESULTS))
    quick["bench.extract"]["_run"]["scale"] = 0.05
    assert "at scale 0.05, 1.0 (a quick check, not a measurement)" in readme.table(quick).splitlines()[0]


def test_readme_rewritten_between_markers_only(tmp_path, capsys):
    results, page = tmp_path / "results.json", tmp_path / "README.md"
    results.write_text(json.dumps(RESULTS))
    page.write_text(f"# title\n\nbefore\n{readme.BEGIN}\nold table\n{readme.END}\nafter\n")
    assert readme.main(["--results", str(results), "--readme", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# title\n\nbefore\n") and text.endswith(f"{readme.END}\nafter\n")
    assert "old table" not in text and "**3.12×**" in text
    assert readme.main(["--results", str(results), "--readme", str(page)]) == 0
    assert page.read_text() == text                                # idempotent


def test_readme_errors_are_one_line(tmp_path, capsys):
    page = tmp_path / "README.md"
    page.write_text("no markers\n")
    assert readme.main(["--results", str(tmp_path / "missing.json"), "--readme", str(page)]) == 1
    assert "run `make bench`" in capsys.readouterr().err
    (tmp_path / "r.json").write_text(json.dumps(RESULTS))
    assert readme.main(["--results", str(tmp_path / "r.json"), "--readme", str(page)]) == 1
    assert "has no bench table markers" in capsys.readouterr().err
    assert page.read_text() == "no markers\n"


def test_clip_rows_name_bf16_only_where_it_was_measured():
    fp32_only = {"samples": 256, "batch_size": 64, "stage_fp32_samples_per_s": 14.8, "floor_fp32_samples_per_s": 15.6,
                 "clip_retrieval_samples_per_s": 6.9, "stage_vs_clip_retrieval_ratio": 2.13,
                 "stage_fp32_vs_clip_retrieval_ratio": 2.13, "floor_over_stage_fp32_ratio": 1.06}
    text = " ".join(" ".join(row) for row in readme.clip(fp32_only))
    assert "bf16" not in text.replace("no bf16 on this CPU", "")
    assert "**2.13×** (goal ≥ 1.5); no bf16 on this CPU" in text and "**1.06×** fp32 (goal ≤ 1.25)" in text
    both = {**fp32_only, "stage_bf16_samples_per_s": 29.0, "stage_vs_clip_retrieval_ratio": 4.2,
            "floor_over_stage_bf16_ratio": 1.05}
    text = " ".join(" ".join(row) for row in readme.clip(both))
    assert "stage in bf16 **4.20×**" in text and "**1.06×** fp32, **1.05×** bf16" in text
