"""MM-Vet (218 open-ended questions) from its release: `mm-vet/mm-vet.json` + `mm-vet/images/`.

`mm-vet.json` maps `v1_N` -> `{imagename, capability (list: rec, ocr, know, gen, spat, math), question,
answer}` (answers may join elements with <AND> / <OR>). Scored only by a GPT judge, with MM-Vet's few-shot
grading prompt as VLMEvalKit writes it (`vlmeval/dataset/utils/mmvet.py` `build_mmvet_gpt4_prompt`,
`MMVet_auxeval`: up to 5 tries at temperature 0, 0.5, ..., a reply outside [0, 1] retried, 0 after 5 failures;
`MMVet_acc`: the mean grade x 100, per capability). Without a judge (evaluation/judge.py: EVAL_JUDGE_URL,
EVAL_JUDGE_MODEL, EVAL_JUDGE_API_KEY) the score is "not scored", never a number.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator

from evaluation.benchmark import BENCHMARKS, Benchmark, Result, Sample, Score, read_json, require
from evaluation.choice_accuracy import mean
from evaluation.judge import Judge, JudgeError

CAPABILITIES = ("rec", "ocr", "know", "gen", "spat", "math")
GRADING_PROMPT = """
Compare the ground truth and prediction from AI models, to give a correctness score for the prediction.
<AND> in the ground truth means it is totally right
only when all elements in the ground truth are present in the prediction,
and <OR> means it is totally right when any one element in the ground truth is present in the prediction.
The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right).
Just complete the last space of the correctness score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries
Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes,
while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues
because the names of these countries do not accurately represent their landscapes. |
The meme talks about Iceland and Greenland. It's pointing out that despite their names,
Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries
Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes,
while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues
because the names of these countries do not accurately represent their landscapes. |
The meme is using humor to point out the misleading nature of Iceland's and Greenland's names.
Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow.
The text 'This is why I have trust issues' is a playful way to suggest
that these contradictions can lead to distrust or confusion.
The humor in this meme is derived from the unexpected contrast between the names of the countries
and their actual physical characteristics. | 1.0
"""


def grading_prompt(question: str, answer: str, prediction: str) -> str:
    answer = answer.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    return GRADING_PROMPT + "\n" + " | ".join([question, answer, prediction, ""])


def judge_grade(complete: Callable[[str, float], str], prompt: str, tries: int = 5) -> tuple[float, bool]:
    """(grade, parsed): the first reply that is a number in [0, 1]; 0.0 and False after `tries` failures."""
    for attempt in range(tries):
        reply = complete(prompt, attempt * 0.5)
        try:
            grade = float(reply)
        except ValueError:
            continue
        if 0.0 <= grade <= 1.0:
            return grade, True
    return 0.0, False


@BENCHMARKS.register("mmvet")
class MMVet(Benchmark):
    modality = "image"
    max_new_tokens = 512  # open-ended, explanations included
    locations = ("mm-vet/mm-vet.json", "MM-Vet/mm-vet.json", "mm-vet.json")
    release = "mm-vet.json + images/ of the MM-Vet release (github.com/yuweihao/MM-Vet)"

    def samples(self) -> Iterator[Sample]:
        path = self.locate()
        records = read_json(path, dict)
        for key, record in records.items():
            require(record, ("imagename", "question", "answer", "capability"), f"{path} {key}")
            capability = record["capability"]
            capability = capability.split(",") if isinstance(capability, str) else list(capability)
            yield Sample(id=key, conversation=[{"role": "user", "content": "<image>\n" + record["question"]}],
                         answer=str(record["answer"]), images=[str(path.parent / "images" / record["imagename"])],
                         meta={"question": record["question"], "capability": sorted(capability)})

    def score(self, results: list[Result], judge: Judge | None = None) -> Score:
        judge = judge or Judge.from_env()
        protocol = "MM-Vet GPT grading (VLMEvalKit build_mmvet_gpt4_prompt / MMVet_acc)"
        if judge is None:
            return Score(self.name, protocol, "score (%)", None, count=len(results),
                         note="not scored: no judge configured (set EVAL_JUDGE_URL and EVAL_JUDGE_MODEL)")
        grades, unparsed = [], 0
        by_capability: dict[str, list[float]] = defaultdict(list)
        try:
            for r in results:
                grade, parsed = (0.0, True) if r.prediction is None else judge_grade(
                    judge.complete, grading_prompt(r.meta["question"], str(r.answer), r.prediction))
                unparsed += not parsed
                grades.append(grade)
                for capability in r.meta["capability"]:
                    by_capability[capability].append(grade)
        except JudgeError as err:
            return Score(self.name, protocol, "score (%)", None, count=len(results), note=f"not scored: {err}")
        return Score(self.name, protocol + f"; judge {judge.describe()}", "score (%)", mean(grades) * 100,
                     categories={c: mean(by_capability[c]) * 100 for c in CAPABILITIES if c in by_capability},
                     count=len(results), unparsed=unparsed)
