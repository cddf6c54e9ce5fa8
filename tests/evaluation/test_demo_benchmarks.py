"""Demo benchmarks: the held-out split of the demo dataset, one registered benchmark per task, exact scores."""
import json

import pytest

from data.demo_data import build_demo_data
from evaluation import BENCHMARKS
from evaluation.benchmark import MissingData, Result
from evaluation.demo import DemoBenchmark


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    build_demo_data(root, samples_per_kind=8, eval_fraction=0.5)
    return root


def test_every_demo_benchmark_reads_its_held_out_records(demo_data, processor):
    held_out = [json.loads(line) for line in (demo_data / "eval.jsonl").read_text().splitlines()]
    for name in BENCHMARKS.group("demo"):
        benchmark = BENCHMARKS.get(name)(demo_data)
        assert isinstance(benchmark, DemoBenchmark)
        try:
            samples = list(benchmark.samples())
        except MissingData:  # e.g. no speech clip landed in a small held-out split
            assert not any(r["id"].split("-")[0] in benchmark.kinds for r in held_out)
            continue
        assert {s.id for s in samples} == {r["id"] for r in held_out if r["id"].split("-")[0] in benchmark.kinds}
        for sample in samples:
            assert all(turn["role"] != "assistant" for turn in sample.conversation)  # the answer is not in the prompt
            processor(sample.processor_input(), generation=True)  # media resolve relative to the data root
        results = [Result(s.id, s.answer.upper() + ".", s.answer, s.meta) for s in samples]
        score = benchmark.score(results)
        assert score.value == (0.0 if name == "demo-speech" else 100.0)  # case and punctuation do not count
        assert score.extra["chance"] == pytest.approx(
            {"demo-shapes": 25.0, "demo-words": 100 / 6, "demo-beeps": 25.0, "demo-motion": 50.0,
             "demo-speech": 100.0}[name])


def test_accuracy_and_wer_on_known_predictions(demo_data):
    benchmark = BENCHMARKS.get("demo-motion")(demo_data)
    results = [Result("a", "left to right", "left to right"), Result("b", "left to right\nbecause", "right to left"),
               Result("c", None, "right to left", error="decode failed"), Result("d", "Right to left!", "right to left")]
    assert benchmark.score(results).value == 50.0
    speech = BENCHMARKS.get("demo-speech")(demo_data)
    score = speech.score([Result("s", "he was not an ill young man", "he was not an ill disposed young man")])
    assert score.value == pytest.approx(100 / 8)
