"""AI2D (test, 3088 diagrams questions) from VLMEvalKit's `AI2D_TEST.tsv`.

Prompt and scoring per protocol:
- `vlmevalkit`: `ImageMCQDataset.build_prompt` ("Question: ...\\nOptions:\\nA. ...\\nPlease select the correct
  answer from the options above."), answers matched by VLMEvalKit's `can_infer` (exact matching, no judge);
- `lmms-eval`: `lmms_eval/tasks/ai2d` ("{question}\\nA. ...\\nAnswer with the option's letter from the given
  choices directly."), a leading "X." taken by `MultiChoiceRegexFilter`, then exact match.
"""
from __future__ import annotations

from collections.abc import Iterator

from evaluation.benchmark import BENCHMARKS, Benchmark, Result, Sample, Score
from evaluation.choice_accuracy import accuracy_score, extracted_letters, vlmevalkit_letter
from evaluation.choice_scoring import lmms_eval_leading_letter
from evaluation.tables import cell_text
from evaluation.vlmevalkit_tsv import mcq_results_from_table, read_vlmevalkit_tsv, vlmevalkit_mcq_prompt

LMMS_EVAL_POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."


@BENCHMARKS.register("ai2d")
class AI2D(Benchmark):
    modality = "image"
    max_new_tokens = 16  # lmms-eval's generation_kwargs; a letter needs far fewer
    locations = ("AI2D_TEST.tsv", "AI2D/AI2D_TEST.tsv")
    release = "VLMEvalKit's https://opencompass.openxlab.space/utils/VLMEval/AI2D_TEST.tsv"

    def samples(self) -> Iterator[Sample]:
        path = self.locate()
        for row in read_vlmevalkit_tsv(path, ("index", "question", "answer", "image", "A", "B")):
            options, question = row["options"], cell_text(row["question"])
            if self.protocol == "lmms-eval":
                text = question + "\n" + "\n".join(f"{k}. {v}" for k, v in options.items()) + LMMS_EVAL_POST_PROMPT
            else:
                text = vlmevalkit_mcq_prompt(question, options, cell_text(row.get("hint")))
            yield Sample(id=row["index"], conversation=[{"role": "user", "content": "<image>\n" + text}],
                         answer=cell_text(row["answer"]).strip(), images=row["images"],
                         meta={"options": options, "category": cell_text(row.get("category")) or None})

    def score(self, results: list[Result]) -> Score:
        if self.protocol == "lmms-eval":
            hits, unparsed = extracted_letters(results, lambda r: lmms_eval_leading_letter(r.prediction)
                                               if lmms_eval_leading_letter(r.prediction) in r.meta["options"] else None)
            name = "lmms-eval ai2d: leading 'X.' (MultiChoiceRegexFilter) then exact match"
        else:
            hits, unparsed = extracted_letters(results, vlmevalkit_letter)
            name = "VLMEvalKit AI2D_TEST: can_infer option matching (exact_matching, no judge)"
        return accuracy_score(self.name, name, results, hits, unparsed)

    def results_from_table(self, table, source: str) -> list[Result]:
        return mcq_results_from_table(table, source, {"category": ("category",)})
