"""The lmms-eval plugin on tiny-omni, driven the way lmms-eval 0.7 drives a model: its registry resolves
`ordmoe` through our entry point, requests are real `lmms_eval.api.instance.Instance`s with the argument
tuples lmms-eval's `ConfigurableTask.construct_requests` builds, and the answers are those tools/eval.py gives on
the same questions (generation token for token; loglikelihood as the harness's processor scores an answer)."""
import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

lmms_eval = pytest.importorskip("lmms_eval", reason="the [lmms] extra (Makefile installs it)")
from lmms_eval.api.instance import Instance  # noqa: E402

from evaluation.cache import read_results  # noqa: E402
from tools import eval as eval_tool  # noqa: E402
from training.export import export_trained  # noqa: E402

QUESTIONS = {"shapes-000": "How many red circles are there?", "motion-000": "Which way does the red square move?"}
TASK, SPLIT = "demo", "test"


@pytest.fixture(scope="module")
def setting(tmp_path_factory, tiny_omni):
    """An exported tiny-omni (so both paths load the same weights), a two-question demo split (an image, a
    video), and tools/eval.py's answers on it."""
    root = tmp_path_factory.mktemp("lmms")
    model, config = tiny_omni
    export = export_trained(root / "export", model, "configs/models/tiny-omni.yaml")
    data = root / "data"
    (data / "media").mkdir(parents=True)
    image = Image.new("RGB", (112, 112), "white")
    ImageDraw.Draw(image).ellipse([10, 10, 60, 60], fill=(220, 40, 40))
    image.save(data / "media" / "shapes_000.png")
    with av.open(str(data / "media" / "motion_000.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for t in range(8):
            frame = np.full((64, 96, 3), 255, np.uint8)
            frame[24:40, 10 * t:10 * t + 16] = (200, 30, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    records = [{"id": "shapes-000", "image": "media/shapes_000.png", "answer": "one",
                "conversation": [{"role": "user", "content": f"<image>\n{QUESTIONS['shapes-000']}"},
                                 {"role": "assistant", "content": "one"}]},
               {"id": "motion-000", "video": "media/motion_000.mp4", "answer": "left to right",
                "conversation": [{"role": "user", "content": f"<video>\n{QUESTIONS['motion-000']}"},
                                 {"role": "assistant", "content": "left to right"}]}]
    (data / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = root / "eval"
    assert eval_tool.main([str(export), "--benchmarks", "demo-shapes,demo-motion", "--data-root", str(data),
                           "--output", str(out), "--no-progress"]) == 0
    answers = {r.id: r.prediction for p in out.glob("predictions/*/demo-*.jsonl") if ".rank" not in p.name
               for r in read_results(p)}
    assert set(answers) == set(QUESTIONS) and all(answers.values())
    return export, data, image, answers


@pytest.fixture(scope="module")
def lm(setting):
    """The model as lmms-eval's evaluator builds it: registry class, `create_from_arg_string`, `task_dict`."""
    from lmms_eval.models import get_model

    export, data, image, _ = setting
    model = get_model("ordmoe").create_from_arg_string(f"pretrained={export}", {"batch_size": "2", "device": "cpu"})
    model.task_dict = {TASK: {SPLIT: [{"image": image}, {"video": str(data / "media" / "motion_000.mp4")}]}}
    return model


def _request(kind: str, arguments: tuple, doc_id: int) -> Instance:
    return Instance(request_type=kind, arguments=arguments, idx=0,
                    metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


def _image(doc):
    return [doc["image"]]


def _video(doc):
    return [doc["video"]]


def test_lmms_eval_resolves_ordmoe_through_its_entry_point():
    from lmms_eval.models import MODEL_REGISTRY_V2, get_model, list_available_models

    from evaluation.lmms_plugin import OrdMoELMM
    assert "ordmoe" in list_available_models()
    assert get_model("ordmoe") is OrdMoELMM and get_model("ordmoe_omni") is OrdMoELMM
    assert MODEL_REGISTRY_V2.resolve("ordmoe").model_type == "simple"


def test_generate_until_gives_the_answers_of_tools_eval(setting, lm):
    _, _, _, answers = setting
    tokenizer = lm.processor.tokenizer
    expected = [answers["shapes-000"], answers["motion-000"]]
    for until in (["\n\n"], [expected[0][len(expected[0]) // 2:][:2]]):  # lmms-eval's usual stop, then one that cuts
        gen_kwargs = {"max_new_tokens": 8, "until": until, "do_sample": False, "temperature": 0}
        requests = [_request("generate_until", (QUESTIONS["shapes-000"], dict(gen_kwargs), _image, 0, TASK, SPLIT), 0),
                    _request("generate_until", (QUESTIONS["motion-000"], dict(gen_kwargs), _video, 1, TASK, SPLIT), 1)]
        got = lm.generate_until(requests)
        cut = [answer.split(until[0], 1)[0] for answer in expected]
        assert [tokenizer.encode(g).ids for g in got] == [tokenizer.encode(c).ids for c in cut]
        assert got == cut
    assert len(got[0]) < len(expected[0])  # the second stop really cut


def _answer_logprob(lm, image, choice: str) -> tuple[float, bool]:
    """The harness's scoring of `choice` as the answer: the demo record with `choice` as its assistant turn,
    through the processor's training layout (the one tools/eval.py's processor and training share), summed over
    the answer's tokens (not the end-of-answer token), and whether each is the teacher-forced argmax."""
    record = {"id": "check", "images": [image],
              "conversation": [{"role": "user", "content": f"<image>\n{QUESTIONS['shapes-000']}"},
                               {"role": "assistant", "content": choice}]}
    example = lm.processor(record)
    batch = lm.processor.collate([example])
    with torch.no_grad():
        logits = lm.model(**{k: v for k, v in batch.items() if k not in ("labels", "ids")}).logits[0]
    labels = example["labels"]
    answer = torch.nonzero(labels != -100).flatten()[:len(lm.processor.tokenizer.encode(choice).ids)]
    logprobs = torch.log_softmax(logits.float(), -1)
    return (sum(logprobs[i - 1, labels[i]].item() for i in answer),
            all(logits[i - 1].argmax().item() == labels[i].item() for i in answer))


def test_loglikelihood_ranks_choices_as_the_harness_scores_them(setting, lm):
    _, _, image, answers = setting
    tokenizer = lm.processor.tokenizer
    first = tokenizer.decode(tokenizer.encode(answers["shapes-000"]).ids[:1])  # tools/eval.py's first answer token
    choices = list(dict.fromkeys([first, "one", "two", "four", "three red circles"]))
    # multiple_choice as lmms-eval builds it: one request per choice, continuation = target_delimiter + choice
    requests = [_request("loglikelihood", (QUESTIONS["shapes-000"], f" {c}", _image, 0, TASK, SPLIT), 0)
                for c in choices]
    scores = lm.loglikelihood(requests)
    expected = [_answer_logprob(lm, image, c) for c in choices]
    assert [s for s, _ in scores] == pytest.approx([e for e, _ in expected], abs=1e-4)
    assert [g for _, g in scores] == [g for _, g in expected]
    assert np.argsort([s for s, _ in scores]).tolist() == np.argsort([e for e, _ in expected]).tolist()
    assert all(np.isfinite(s) and s < 0 for s, _ in scores)
    # an unconditional request (acc_mutual_info) is (context, continuation) alone
    assert lm.loglikelihood([_request("loglikelihood", ("", " one"), 0)])[0][0] < 0


def test_generate_until_multi_round_is_refused_in_one_line(lm):
    from evaluation.lmms_plugin import UnsupportedRequest

    request = _request("generate_until_multi_round", (QUESTIONS["shapes-000"], {}, _image, str, 0, TASK, SPLIT), 0)
    with pytest.raises(UnsupportedRequest, match="task.s. demo need generate_until_multi_round") as caught:
        lm.generate_until_multi_round([request])
    assert "\n" not in str(caught.value)


def test_missing_lmms_eval_is_one_line_naming_the_extra():
    # None in sys.modules: `import lmms_eval` fails as it does when the package is not installed
    code = "import sys; sys.modules['lmms_eval'] = None; import evaluation.lmms_plugin"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert run.returncode != 0
    assert "During handling of the above exception" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(
        'ImportError: the lmms-eval plugin needs lmms-eval: pip install -e ".[lmms]"')
