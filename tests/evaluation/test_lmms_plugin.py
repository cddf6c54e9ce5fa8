"""The lmms-eval plugin on tiny-omni: lmms-eval request Instances (an image question, a video question, a
multiple-choice loglikelihood request) give the answers tools/eval.py gives on the same questions."""
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


@pytest.fixture(scope="module")
def setting(tmp_path_factory, tiny_omni):
    """An exported tiny-omni (so both paths load the same weights) and a two-question demo split."""
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
    assert set(answers) == set(QUESTIONS)
    return export, data, image, answers


def _instance(kind: str, arguments: tuple, index: int) -> Instance:
    return Instance(request_type=kind, arguments=arguments, idx=index,
                    metadata={"task": "demo", "doc_id": index, "repeats": 1})


def test_generate_and_loglikelihood_match_tools_eval(setting):
    from evaluation.lmms_plugin import OrdMoELMM

    export, data, image, answers = setting
    lm = OrdMoELMM.create_from_arg_string(f"pretrained={export},device=cpu", {"batch_size": 2})
    docs = [{"image": image}, {"video": str(data / "media" / "motion_000.mp4")}]
    lm.task_dict = {"demo": {"test": docs}}
    gen = {"max_new_tokens": 8, "until": ["\n\n"]}
    requests = [_instance("generate_until", (QUESTIONS["shapes-000"], dict(gen), lambda d: [d["image"]], 0, "demo",
                                             "test"), 0),
                _instance("generate_until", (QUESTIONS["motion-000"], dict(gen), lambda d: [d["video"]], 1, "demo",
                                             "test"), 1)]
    assert lm.generate_until(requests) == [answers["shapes-000"], answers["motion-000"]]

    # multiple choice by loglikelihood: what greedy decoding gives is the greedy continuation, other options are not
    sample = lm.sample(QUESTIONS["shapes-000"], [image], "check")
    prompt = lm.processor(sample, generation=True)
    batch = lm.processor.collate([prompt], padding_side="left")
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "ids")}
    generated = lm.model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, len(prompt["input_ids"]):].tolist()
    tokenizer = lm.processor.tokenizer
    greedy = next(text for k in range(len(generated), 0, -1)  # the longest prefix that survives decode -> encode
                  if tokenizer.encode(text := tokenizer.decode(generated[:k]), add_special_tokens=False).ids
                  == generated[:k])
    options = [greedy, "four", "two"]
    choice = [_instance("loglikelihood", (QUESTIONS["shapes-000"], option, lambda d: [d["image"]], 0, "demo", "test"), i)
              for i, option in enumerate(options)]
    scores = lm.loglikelihood(choice)
    assert scores[0][1] is True
    assert all(np.isfinite(s) and s <= 0 for s, _ in scores)
    # and it is the log-probability a plain forward pass gives those tokens
    target = lm.processor.tokenizer.encode("four", add_special_tokens=False).ids
    batch = lm.processor.collate([dict(prompt, input_ids=torch.cat([prompt["input_ids"], torch.tensor(target)]),
                                       labels=torch.cat([prompt["labels"], torch.tensor(target)]),
                                       modality_ids=torch.cat([prompt["modality_ids"], torch.zeros(len(target),
                                                                                               dtype=torch.long)]))])
    with torch.no_grad():
        logits = lm.model(**{k: v for k, v in batch.items() if k not in ("labels", "ids")}).logits[0]
    start = len(prompt["input_ids"])
    expected = sum(torch.log_softmax(logits[start - 1 + i], -1)[t].item() for i, t in enumerate(target))
    assert scores[1][0] == pytest.approx(expected, abs=1e-4)


def test_lmms_eval_finds_the_model_through_its_entry_point():
    from lmms_eval.models import get_model

    from evaluation.lmms_plugin import OrdMoELMM
    assert get_model("ordmoe") is OrdMoELMM


def test_missing_lmms_eval_is_one_line_naming_the_extra(tmp_path):
    blocker = tmp_path / "lmms_eval.py"
    blocker.write_text("raise ImportError('not installed')\n")
    code = "import sys; sys.path.insert(0, sys.argv[1]); import evaluation.lmms_plugin"
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: the lmms-eval plugin needs lmms-eval: pip install -e '.[lmms]'")
