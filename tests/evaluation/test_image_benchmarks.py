"""Image benchmarks: every registered one read from a fixture in its release format (real images), known
predictions scored exactly under each protocol, samples fed through the real processor; the real records in
tests/assets/ parse; VLMEvalKit's MMStar reference scores are reproduced from its prediction file."""
import base64
import csv
import io
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from evaluation import BENCHMARKS
from evaluation.benchmark import DataError, MissingData, Result
from tools.eval import main as eval_main

DATA_ASSETS = Path(__file__).resolve().parents[2] / "data" / "assets"
TEST_ASSETS = Path(__file__).resolve().parents[1] / "assets"
AI2D_OPTIONS = ["Polyp forming", "Zygote", "Branching", "Planula"]
HEART_OPTIONS = ["ventricular septum", "chorda tendinea", "ventricle", "atrium"]


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_tsv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)


# ---- one native-format fixture per benchmark: (predictions by sample id, {protocol: (value, unparsed)}) ----------
def ai2d_fixture(root: Path):
    diagram = b64(DATA_ASSETS / "ai2d_00002168.png")
    write_tsv(root / "AI2D_TEST.tsv", [
        dict(index=0, question="Ovum and sperm make what?", **dict(zip("ABCD", AI2D_OPTIONS)), answer="B", image=diagram),
        # a short image cell names the row whose image it shares (VLMEvalKit saves space this way)
        dict(index=1, question="What comes first?", **dict(zip("ABCD", AI2D_OPTIONS)), answer="A", image="0"),
        dict(index=2, question="Right atrioventricular valve allows blood to pass from atrium to where?",
             **dict(zip("ABCD", HEART_OPTIONS)), answer="C", image=b64(TEST_ASSETS / "ai2d_00000443.png")),
        dict(index=3, question="Which one?", **dict(zip("ABCD", HEART_OPTIONS)), answer="D", image="2"),
    ])
    predictions = {"0": "B.", "1": "Polyp forming", "2": "C is right, the blood flows into it here",
                   "3": "Cannot determine the answer"}
    # vlmevalkit: "B." -> B (hit); option text -> A (hit); "C" is not among the last five tokens and no option
    # text occurs -> unparsed (wrong); the refusal -> Z (wrong, parsed). lmms-eval: only "B." is a letter.
    return predictions, {"vlmevalkit": (50.0, 1), "lmms-eval": (25.0, 3)}


def mmstar_fixture(root: Path):
    photo = b64(DATA_ASSETS / "coco_000000039769.png")
    options = {"A": "1", "B": "2", "C": "3", "D": "4"}
    rows = [dict(index=i, question=q, **options, answer=a, category=c, **{"l2-category": l2}, image=photo if i == 0 else "0")
            for i, (q, a, c, l2) in enumerate([("How many cats?", "B", "fine-grained perception", "object counting"),
                                               ("How many remotes?", "B", "fine-grained perception", "object counting"),
                                               ("How many couches?", "A", "fine-grained perception", "localization"),
                                               ("How many beds?", "A", "math", "geometry")])]
    write_tsv(root / "MMStar.tsv", rows)
    predictions = {"0": "B", "1": "The answer is (B).", "2": "(C)", "3": "A"}
    # vlmevalkit: 0 hit, 1 hit (letter B among the last tokens), 2 wrong, 3 hit -> 75 over samples.
    # lmms-eval: per l2 mean: counting 100, localization 0, geometry 100 -> 66.67
    return predictions, {"vlmevalkit": (75.0, 0), "lmms-eval": (200 / 3, 0)}


def ocrbench_fixture(root: Path):
    folder = root / "OCRBench"
    (folder / "OCRBench_Images" / "IIIT5K").mkdir(parents=True)
    shutil.copy(DATA_ASSETS / "coco_000000039769.png", folder / "OCRBench_Images" / "IIIT5K" / "1.png")
    record = lambda i, dataset, answers, kind: {"dataset_name": dataset, "id": i, "image_path": "IIIT5K/1.png",  # noqa: E731
                                                 "question": "what is written in the image?", "answers": answers,
                                                 "type": kind}
    records = [record(1, "IIIT5K", "CENTRE", "Regular Text Recognition"),
               record(2, "HME100k", "\\frac { 9 - 1 } { 2 } = 4\n", "Handwritten Mathematical Expression Recognition"),
               record(3, "HME100k", "B a = C H", "Handwritten Mathematical Expression Recognition"),
               record(4, "ESTVQA", ["ABC123", "abc-123"], "Scene Text-centric VQA"),
               record(5, "docVQA", ["yes", "y"], "Doc-oriented VQA")]
    (folder / "OCRBench.json").write_text(json.dumps(records))
    predictions = {"0": "The word is centre.", "1": "$\\frac{9-1}{2}=4$", "2": "ba=ch",
                   "3": "ＡＢＣ１２３", "4": "No"}
    # HME100k ignores spaces but not case (3 misses); the full-width answer scores only under lmms-eval's folding
    return predictions, {"vlmevalkit": (2.0, 0), "lmms-eval": (3.0, 0)}


def mmmu_fixture(root: Path):
    rows = [json.loads(line) for line in (TEST_ASSETS / "mmmu_ai2d_subset.jsonl").read_text().splitlines()]
    image_of = {"images/validation_Clinical_Medicine_23_1.png": TEST_ASSETS / "validation_Clinical_Medicine_23_1.png",
                "images/ai2d_00002168.png": DATA_ASSETS / "ai2d_00002168.png",
                "images/ai2d_00000443.png": TEST_ASSETS / "ai2d_00000443.png"}

    def table(records):
        return pd.DataFrame([{"id": r["id"], "question": r["question"], "options": str(r["options"]),
                              "answer": r["answer"], "question_type": r.get("question_type", "multiple-choice"),
                              "image_1": {"bytes": image_of[r["image_1"]].read_bytes(), "path": None},
                              **{f"image_{k}": None for k in range(2, 8)}} for r in records])
    clinical = dict(rows[0], id="validation_Clinical_Medicine_23")
    open_question = {"id": "validation_Clinical_Medicine_24", "question": "<image 1> What is the ratio?",
                     "options": [], "answer": "['24/7', '3.429']", "question_type": "open",
                     "image_1": rows[0]["image_1"]}
    for subject, records in (("Clinical_Medicine", [clinical, open_question]),
                             ("Biology", [dict(rows[1], id="validation_Biology_1"), dict(rows[2], id="validation_Biology_2")])):
        (root / "MMMU" / subject).mkdir(parents=True)
        table(records).to_parquet(root / "MMMU" / subject / "validation-00000-of-00001.parquet")
    predictions = {"validation_Clinical_Medicine_23": "(D) Kidneys", "validation_Clinical_Medicine_24": "The ratio is 3.43.",
                   "validation_Biology_1": "I am not sure.", "validation_Biology_2": "(A) or maybe (C)"}
    # (D) hit; 3.43 equals 3.429 rounded to 2 places (several accepted answers); the unparseable answer falls back
    # to the seeded random choice (A: wrong for B); of two bracketed letters the last, C, wins (hit)
    return predictions, {"vlmevalkit": (75.0, 1), "lmms-eval": (75.0, 1)}


def mathvista_fixture(root: Path):
    folder = root / "MathVista"
    (folder / "images").mkdir(parents=True)
    for pid, source in (("106", DATA_ASSETS), ("540", TEST_ASSETS), ("824", TEST_ASSETS)):
        shutil.copy(source / f"mathvista_testmini_pid{pid}.png", folder / "images" / f"{pid}.jpg")
    shutil.copy(TEST_ASSETS / "mathvista_testmini_subset.json", folder / "testmini.json")
    predictions = {"106": "0", "540": "(A) 3/11", "824": "She needs $0.130 (unit: $)."}
    return predictions, {"vlmevalkit": (100.0, 0), "lmms-eval": (100.0, 0)}


def mmvet_fixture(root: Path):
    folder = root / "mm-vet"
    (folder / "images").mkdir(parents=True)
    shutil.copy(DATA_ASSETS / "coco_000000039769.png", folder / "images" / "v1_0.png")
    (folder / "mm-vet.json").write_text(json.dumps({"v1_0": {"imagename": "v1_0.png", "capability": ["rec"],
                                                              "question": "How many cats?", "answer": "2"}}))
    return {"v1_0": "two"}, {"vlmevalkit": (None, 0), "lmms-eval": (None, 0)}  # no judge: not scored


FIXTURES = {"ai2d": ai2d_fixture, "mmstar": mmstar_fixture, "ocrbench": ocrbench_fixture, "mmmu": mmmu_fixture,
            "mathvista": mathvista_fixture, "mmvet": mmvet_fixture}


def test_every_image_benchmark_has_a_fixture():
    assert sorted(FIXTURES) == BENCHMARKS.group("image")


def scored(name: str, root: Path, protocol: str, predictions: dict):
    benchmark = BENCHMARKS.build(name, root, protocol)
    samples = list(benchmark.samples())
    assert sorted(s.id for s in samples) == sorted(predictions)
    return benchmark.score([Result(s.id, predictions[s.id], s.answer, s.meta) for s in samples]), samples


@pytest.mark.parametrize("protocol", ["vlmevalkit", "lmms-eval"])
@pytest.mark.parametrize("name", BENCHMARKS.group("image"))
def test_known_predictions_give_the_exact_score(name, protocol, tmp_path, monkeypatch):
    monkeypatch.delenv("EVAL_JUDGE_URL", raising=False)
    predictions, expected = FIXTURES[name](tmp_path)
    score, _ = scored(name, tmp_path, protocol, predictions)
    value, unparsed = expected[protocol]
    assert score.value == pytest.approx(value) if value is not None else score.value is None
    assert score.unparsed == unparsed
    assert score.count == len(predictions) and score.protocol


@pytest.mark.parametrize("name", BENCHMARKS.group("image"))
def test_fixture_samples_go_through_the_processor(name, tmp_path, processor):
    predictions, _ = FIXTURES[name](tmp_path)
    for sample in BENCHMARKS.build(name, tmp_path).samples():
        example = processor(sample.processor_input(), generation=True)
        assert example["image_grid_thw"].shape[0] == len(sample.images) >= 1


@pytest.mark.parametrize("name", BENCHMARKS.group("image"))
def test_missing_data_names_the_expected_location(name, tmp_path):
    with pytest.raises(MissingData, match=str(tmp_path)):
        list(BENCHMARKS.build(name, tmp_path).samples())


def test_ocrbench_full_width_folding_is_the_lmms_eval_protocol_only():
    from evaluation.ocrbench_scoring import fold_fullwidth, ocrbench_match
    assert fold_fullwidth("ＡＢＣ１２３\u3000！") == "ABC123 !"
    assert not ocrbench_match("ＡＢＣ１２３", "abc123", "ESTVQA", fold=False)
    assert ocrbench_match("ＡＢＣ１２３", "abc123", "ESTVQA", fold=True)
    assert ocrbench_match("x = \\frac{a}{b}", "\\frac { a } { b }", "HME100k")
    assert not ocrbench_match("\\FRAC{a}{b}", "\\frac { a } { b }", "HME100k")


def test_the_real_ocrbench_annotations_parse(tmp_path):
    folder = tmp_path / "OCRBench"
    folder.mkdir()
    shutil.copy(TEST_ASSETS / "ocrbench_annotations.json", folder / "OCRBench.json")
    samples = list(BENCHMARKS.build("ocrbench", tmp_path).samples())
    assert len(samples) == 1000 and len({s.id for s in samples}) == 1000
    score = BENCHMARKS.build("ocrbench", tmp_path).score(
        [Result(s.id, s.answer[0], s.answer, s.meta) for s in samples])  # every ground truth matches itself
    assert score.value == 1000 and score.categories == {
        "Text Recognition": 300, "Scene Text-centric VQA": 200, "Doc-oriented VQA": 200,
        "Key Information Extraction": 200, "Handwritten Mathematical Expression Recognition": 100}


def test_the_real_mathvista_records_parse_with_the_official_query(tmp_path):
    mathvista_fixture(tmp_path)
    samples = {s.id: s for s in BENCHMARKS.build("mathvista", tmp_path).samples()}
    assert samples["824"].conversation[0]["content"].endswith(
        "Question: How much money does Luca need to buy a sour apple candy and a butterscotch candy? (Unit: $)")
    assert "Choices:\n(A) 3/11\n(B) 8/11" in samples["540"].conversation[0]["content"]


def test_mmmu_image_markers_become_processor_markers(tmp_path):
    mmmu_fixture(tmp_path)
    sample = next(s for s in BENCHMARKS.build("mmmu", tmp_path).samples() if s.id == "validation_Clinical_Medicine_23")
    text = sample.conversation[0]["content"]
    assert "<image 1>" not in text and text.count("<image>") == len(sample.images) == 1
    assert "(D) Kidneys\n" in text and sample.answer == "D"


def test_mmstar_release_parquet_reads_inline_options(tmp_path):
    photo = (DATA_ASSETS / "coco_000000039769.png").read_bytes()
    pd.DataFrame([{"index": 0, "question": "How many cats are there?\nOptions: A: 1, B: 2, C: 3, D: 4",
                   "image": {"bytes": photo, "path": None}, "answer": "B", "category": "fine-grained perception",
                   "l2_category": "object counting", "meta_info": None}]).to_parquet(tmp_path / "mmstar.parquet")
    (sample,) = BENCHMARKS.build("mmstar", tmp_path).samples()
    assert sample.meta["options"] == {"A": "1", "B": "2", "C": "3", "D": "4"}
    assert "Options:\nA. 1\nB. 2" in sample.conversation[0]["content"]
    lmms = next(BENCHMARKS.build("mmstar", tmp_path, "lmms-eval").samples())
    assert lmms.conversation[0]["content"].endswith("D: 4\nAnswer with the option's letter from the given choices directly")


def test_mmvet_with_a_judge_follows_the_retry_rule(tmp_path):
    mmvet_fixture(tmp_path)

    class FakeJudge:
        def __init__(self, replies):
            self.replies, self.prompts = list(replies), []

        def complete(self, prompt, temperature):
            self.prompts.append((prompt, temperature))
            return self.replies.pop(0)

        def describe(self):
            return "fake"

    benchmark = BENCHMARKS.build("mmvet", tmp_path)
    (sample,) = benchmark.samples()
    results = [Result(sample.id, "two", sample.answer, sample.meta)]
    judge = FakeJudge(["garbage", "1.7", "0.8"])
    score = benchmark.score(results, judge=judge)
    assert score.value == pytest.approx(80.0) and score.categories == {"rec": pytest.approx(80.0)}
    assert [t for _, t in judge.prompts] == [0.0, 0.5, 1.0]
    assert judge.prompts[0][0].endswith("How many cats? | 2 | two | ")
    assert benchmark.score(results, judge=FakeJudge(["x"] * 5)).unparsed == 1


def test_a_missing_column_names_the_column_and_the_file(tmp_path):
    write_tsv(tmp_path / "AI2D_TEST.tsv", [dict(index=0, question="q", A="x", B="y", image="abc")])
    with pytest.raises(DataError, match=r"AI2D_TEST.tsv: missing column\(s\) 'answer'"):
        list(BENCHMARKS.build("ai2d", tmp_path).samples())
    write_tsv(tmp_path / "AI2D_TEST.tsv", [dict(index=0, question="q", A="x", B="y", answer="A", image="7")])
    with pytest.raises(DataError, match="line 2 .*refers to row '7'"):
        list(BENCHMARKS.build("ai2d", tmp_path).samples())


def test_rescoring_vlmevalkit_mmstar_predictions_reproduces_its_reference(tmp_path, capsys):
    reference = next(csv.DictReader(io.StringIO((TEST_ASSETS / "mmstar_vila13b_acc.csv").read_text())))
    assert eval_main(["--rescore", str(TEST_ASSETS / "mmstar_vila13b_predictions.xlsx"), "--benchmarks", "mmstar",
                      "--output", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    score = report["rows"][0]["scores"]["mmstar"]
    assert score["value"] / 100 == pytest.approx(float(reference.pop("Overall")), abs=1e-12)
    reference.pop("split")
    assert {k: v / 100 for k, v in score["categories"].items()} == pytest.approx(
        {k: float(v) for k, v in reference.items()}, abs=1e-12)
    assert score["count"] == 1500 and (tmp_path / "report.png").stat().st_size > 0
    assert "| mmstar_vila13b_predictions | 44.3 |" in capsys.readouterr().out


def test_real_mmmu_and_ai2d_records_read_as_ai2d_rows(tmp_path):
    rows = [json.loads(line) for line in (TEST_ASSETS / "mmmu_ai2d_subset.jsonl").read_text().splitlines()][1:]
    images = [DATA_ASSETS / "ai2d_00002168.png", TEST_ASSETS / "ai2d_00000443.png"]
    write_tsv(tmp_path / "AI2D_TEST.tsv", [
        dict(index=i, question=r["question"].replace("<image 1> ", ""), **dict(zip("ABCD", r["options"])),
             answer=r["answer"], image=b64(path)) for i, (r, path) in enumerate(zip(rows, images))])
    samples = list(BENCHMARKS.build("ai2d", tmp_path).samples())
    assert [s.answer for s in samples] == ["B", "C"]
    assert Image.open(io.BytesIO(samples[1].images[0])).size == Image.open(images[1]).size
