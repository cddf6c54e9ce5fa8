"""The report's average: percentages of the full mark, error rates (WER/CER) shown but never averaged."""
from evaluation.benchmark import Score
from evaluation.report import Report, ReportRow, to_markdown


def _score(name: str, value: float | None, **kwargs) -> Score:
    return Score(benchmark=name, protocol="test", metric="m", value=value, **kwargs)


def test_average_uses_full_marks_and_leaves_error_rates_out():
    row = ReportRow("run", {"a": _score("a", 80.0), "ocr": _score("ocr", 600.0, full_mark=1000.0),
                            "asr": _score("asr", 188.0, higher_is_better=False)})
    assert row.average() == (70.0, 2)  # (80 + 60) / 2; the WER of 188 is not an accuracy
    report = Report(benchmarks=["a", "ocr", "asr"], protocol="p", rows=[row])
    table = to_markdown(report)
    assert "| run | 80.0 | 600.0 | 188.0 | 70.0 |" in table  # nothing is missing: no (n/m) suffix
    assert report.to_json()["rows"][0]["averaged_over"] == 2


def test_a_row_missing_a_benchmark_says_how_many_it_averages():
    row = ReportRow("run", {"a": _score("a", 50.0), "asr": _score("asr", 10.0, higher_is_better=False)})
    table = to_markdown(Report(benchmarks=["a", "b", "asr"], protocol="p", rows=[row]))
    assert "| 50.0 (1/2) |" in table


def test_not_scored_benchmarks_print_no_number():
    row = ReportRow("run", {"judge": _score("judge", None, note="not scored: no judge")})
    assert "| run | not scored | - |" in to_markdown(Report(benchmarks=["judge"], protocol="p", rows=[row]))
