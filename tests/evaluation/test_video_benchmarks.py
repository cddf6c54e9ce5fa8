"""Video benchmarks: every registered one reads a fixture in its release format written here, known predictions
give the exact expected score, and its samples become model inputs (frames decoded only then)."""
import json
import shutil
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data.media import load_video
from data.processor import ProcessorError
from evaluation import BENCHMARKS
from evaluation.benchmark import DataError, Result
from evaluation.video import MVBENCH_TASKS, VideoBenchmark, read_srt
from evaluation.video_media import AudioTrack, VideoFrames

DATA_ASSETS = Path(__file__).resolve().parents[2] / "data" / "assets"
FRAMES = 8  # the tests sample 8 frames (the paper's 128 is the default)


def write_video(path: Path, frames: int = 24, rate: int = 8, size=(64, 48), codec: str = "mpeg4") -> Path:
    """A clip whose frame t is a flat grey of level 10 * t (so sampled frames say which they are)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = size
        stream.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        for t in range(frames):
            image = np.full((size[1], size[0], 3), min(10 * t, 250), np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_json(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, ensure_ascii=False))
    return path


def videomme(root: Path) -> dict:
    base = root / "Video-MME"
    write_video(base / "data" / "vid1.mp4")
    write_video(base / "data" / "vid2.mp4")
    (base / "subtitle").mkdir(parents=True)
    (base / "subtitle" / "vid1.srt").write_text(
        "1\n00:00:00,000 --> 00:00:00,400\n<font color=\"white\" size=\".72c\">shown at the first frame</font>\n\n"
        "2\n00:00:00,600 --> 00:00:00,900\nbetween two sampled frames\n")
    options = ["A. red", "B. green", "C. blue", "D. white"]
    rows = [dict(video_id="001", duration="short", domain="Knowledge", sub_category="Astronomy", url="",
                 videoID="vid1", question_id="001-1", task_type="Counting Problem", question="Q1?",
                 options=options, answer="A"),
            dict(video_id="001", duration="short", domain="Knowledge", sub_category="Astronomy", url="",
                 videoID="vid1", question_id="001-2", task_type="OCR Problems", question="Q2?", options=options,
                 answer="B"),
            dict(video_id="002", duration="long", domain="Sports Competition", sub_category="Esports", url="",
                 videoID="vid2", question_id="002-1", task_type="Counting Problem", question="Q3?",
                 options=options, answer="C")]
    (base / "videomme").mkdir()
    pd.DataFrame(rows).to_parquet(base / "videomme" / "test-00000-of-00001.parquet")
    # official extraction: "The answer is B." -> B (wrong for 001-1); "(B)" -> B; a long answer without A-D: unparsed
    predictions = {"001-1": "The answer is B.", "001-2": "(B) green", "002-1": "I think it is C"}
    return {"predictions": predictions, "value": 100 * 2 / 3, "categories": {"long": 100.0, "short": 50.0}}


def mvbench(root: Path) -> dict:
    base = root / "MVBench"
    predictions = {}
    for task, folders in MVBENCH_TASKS.items():
        folder, _ = folders[0]
        name = f"{task}.mp4"
        if task == "fine_grained_action":
            name = f"{task}.gif"
            write_video(base / "video" / folder / name, frames=12, codec="gif")
        elif task == "episodic_reasoning":  # TVQA: a folder of frames at 3 fps
            name = "s01e01_seg02_clip_00"
            for t in range(12):
                frame_dir = base / "video" / folder / name
                frame_dir.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (64, 48), (20 * t,) * 3).save(frame_dir / f"{t:05d}.jpg")
        else:
            write_video(base / "video" / folder / name)
        record = {"video": name, "question": f"What happens in {task}?", "candidates": ["yes", "no", "maybe"],
                  "answer": "no"}
        if folders[0][1]:
            record.update(start=0.5, end=2.5)
        write_json(base / "json" / f"{task}.json", [record])
        # official check_ans: "(B) no" and "B" are right; "A. yes" is wrong
        predictions[f"{task}/0"] = {"action_count": "A. yes", "state_change": "B"}.get(task, "(B) no")
    return {"predictions": predictions, "value": 100 * 19 / 20}


def longvideobench(root: Path) -> dict:
    base = root / "LongVideoBench"
    write_video(base / "videos" / "abc.mp4", frames=32)  # 4 s
    write_json(base / "subtitles" / "abc_en.json", [
        {"start": "00:00:00.000", "end": "00:00:00.400", "line": "hello there"},
        {"start": "00:00:02.000", "end": "00:00:03.000", "line": "goodbye"}])
    records = [{"id": "q1", "video_id": "abc", "video_path": "abc.mp4", "subtitle_path": "abc_en.json",
                "question": "Who speaks?", "candidates": ["a man", "a woman", "nobody"], "correct_choice": 1,
                "duration": 4.0, "duration_group": 15, "question_category": "S2E", "topic_category": "NP",
                "level": "L1-Perception", "starting_timestamp_for_subtitles": 0},
               {"id": "q2", "video_id": "abc", "video_path": "abc.mp4", "subtitle_path": "abc_en.json",
                "question": "What colour?", "candidates": ["grey", "red", "blue", "green"], "correct_choice": 0,
                "duration": 4.0, "duration_group": 15, "question_category": "E2O", "topic_category": "NP",
                "level": "L1-Perception", "starting_timestamp_for_subtitles": 0}]
    write_json(base / "lvb_val.json", records)
    return {"predictions": {"q1": "B. a woman", "q2": "The best answer is B"}, "value": 50.0}


def didemo(root: Path) -> dict:
    base = root / "DiDeMo"
    write_video(base / "videos" / "12345@N00_678_abc.mp4", frames=64, rate=2)  # 32 s, the .mov re-encoded
    write_json(base / "test_data.json", [
        {"annotation_id": 1, "description": "the dog runs", "video": "12345@N00_678_abc.mov",
         "times": [[1, 3], [1, 3], [1, 2], [5, 5]], "num_segments": 6},
        {"annotation_id": 2, "description": "a man waves", "video": "12345@N00_678_abc.mov",
         "times": [[0, 0], [0, 0], [0, 0], [0, 1]], "num_segments": 6},
        {"annotation_id": 3, "description": "it gets dark", "video": "12345@N00_678_abc.mov",
         "times": [[4, 5], [4, 5], [4, 5], [4, 5]], "num_segments": 6}])
    # 1: 5-20 s = (1, 3): top-3 IoUs 1, 1, 2/3 -> 0.889; 2: "segment 0 to 1" = (0, 1): top-3 IoUs 1, 0.5, 0.5
    # -> 0.667 (counts at 0.5, not at 0.7); 3: unparsed -> 0
    predictions = {"1": "From 5 to 20 seconds.", "2": "segment 0 to 1", "3": "at the end"}
    return {"predictions": predictions, "value": 100 * 2 / 3,
            "categories": {"R@1,IoU=0.7": 100 / 3, "mIoU": 100 * ((1 + 1 + 2 / 3) / 3 + (1 + 0.5 + 0.5) / 3) / 3}}


def avqa(root: Path) -> dict:
    base = root / "AVQA"
    (base / "videos").mkdir(parents=True)
    shutil.copy(DATA_ASSETS / "flipping_a_pancake.mkv", base / "videos" / "flipping_a_pancake.mkv")
    write_json(base / "val_qa.json", [
        {"id": 7, "video_name": "flipping_a_pancake", "video_id": 1, "question_text": "What is being cooked?",
         "multi_choice": ["pancake", "steak", "soup", "rice"], "answer": 0, "question_relation": "Both",
         "question_type": "Which"},
        {"id": 8, "video_name": "flipping_a_pancake", "video_id": 1, "question_text": "What sound is heard?",
         "multi_choice": ["sizzling", "barking", "singing", "rain"], "answer": 0, "question_relation": "Audio",
         "question_type": "Come From"}])
    return {"predictions": {"7": "A", "8": "The answer is B"}, "value": 50.0}


FIXTURES = {"videomme": videomme, "videomme-sub": videomme, "mvbench": mvbench, "longvideobench": longvideobench,
            "didemo": didemo, "avqa": avqa}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    built = {}
    for make in FIXTURES.values():
        if make not in built:
            built[make] = make(root)  # videomme and videomme-sub share one release
    return root, {name: built[make] for name, make in FIXTURES.items()}


def test_every_video_benchmark_has_a_fixture():
    assert set(BENCHMARKS.group("video")) == set(FIXTURES)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_known_predictions_give_the_exact_score(name, data_root):
    root, expected = data_root
    benchmark = BENCHMARKS.get(name)(root, num_frames=FRAMES)
    assert isinstance(benchmark, VideoBenchmark)
    samples = list(benchmark.samples())
    predictions = expected[name]["predictions"]
    assert sorted(s.id for s in samples) == sorted(predictions)
    results = [Result(s.id, predictions[s.id], s.answer, s.meta) for s in samples]
    results = [Result.from_json(json.loads(json.dumps(r.to_json()))) for r in results]  # as the cache stores them
    score = benchmark.score(results)
    assert score.value == pytest.approx(expected[name]["value"])
    for key, value in expected[name].get("categories", {}).items():
        assert score.categories[key] == pytest.approx(value), key


def test_paper_default_is_128_uniform_frames(data_root):
    root, _ = data_root
    [sample, *_] = BENCHMARKS.get("videomme")(root).samples()
    assert sample.videos[0].num_frames == 128


def test_videomme_subtitles_are_the_lines_at_the_sampled_frames(data_root):
    root, _ = data_root
    plain, subtitled = (list(BENCHMARKS.get(n)(root, num_frames=FRAMES).samples())[0] for n in ("videomme", "videomme-sub"))
    assert "subtitles" not in plain.conversation[0]["content"]
    text = subtitled.conversation[0]["content"]
    # 8 frames over 3 s sit at 0.1875 + 0.375 k s: the first cue (0-0.4 s) is shown, the second (0.6-0.9 s) is not
    assert "This video's subtitles are listed below:\nshown at the first frame\n" in text
    assert "between two sampled frames" not in text and "<font" not in text
    assert text.endswith("D. white\nThe best answer is:")


def test_srt_parsing(tmp_path):
    path = tmp_path / "a.srt"
    path.write_text("\ufeff1\n00:01:02,500 --> 00:01:03,250\nline one\nline two\n\n2\n00:01:04,000 --> 00:01:05,000\n\n")
    assert read_srt(path) == [(62.5, 63.25, "line one line two")]


def test_mvbench_frame_folders_gifs_and_bounds(data_root, processor):
    root, _ = data_root
    samples = {s.id: s for s in BENCHMARKS.get("mvbench")(root, num_frames=FRAMES).samples()}
    assert len(samples) == 20
    assert samples["action_sequence/0"].videos[0].window == (0.5, 2.5)  # official start/end bound
    assert samples["object_shuffle/0"].videos[0].window is None
    assert samples["object_shuffle/0"].answer == "(B) no"
    folder = samples["episodic_reasoning/0"].videos[0].load()
    # frames 0.5 s - 2.5 s of a 3 fps folder: frames 1..7, 8 sampled -> every frame once, in order
    assert folder.indices == list(range(1, 8)) and folder.frames.shape[1:] == (48, 64, 3)
    gif = samples["fine_grained_action/0"].videos[0].load()
    assert len(gif.frames) == FRAMES
    bounded = samples["action_sequence/0"].videos[0].load()
    assert bounded.indices[0] >= 4 and bounded.indices[-1] <= 20  # 8 fps: frames 4..20 only
    source = samples["action_sequence/0"].videos[0].source
    assert load_video(source, FRAMES, backend="pyav", window=(0.5, 2.5)).indices == bounded.indices  # the fallback
    for sample in (samples["episodic_reasoning/0"], samples["fine_grained_action/0"]):
        example = processor(sample.processor_input(), generation=True)
        assert example["pixel_values_videos"].shape[0] > 0


def test_longvideobench_interleaves_subtitles_with_frames(data_root):
    root, _ = data_root
    first = next(BENCHMARKS.get("longvideobench")(root, num_frames=FRAMES).samples())
    content = first.conversation[0]["content"]
    # 8 frames over 4 s at 0.25 + 0.5 k: "hello there" (midpoint 0.2 s) comes before the first frame,
    # "goodbye" (midpoint 2.5 s) after the frame at 2.25 s (the fifth): two <video> spans of 5 and 3 frames
    assert content.startswith("hello there\n<video>\ngoodbye\n<video>\nWho speaks?\nA. a man\nB. a woman")
    assert [v.num_frames for v in first.videos] == [5, 3]
    assert sum(len(v.load().frames) for v in first.videos) == FRAMES


def test_avqa_sends_the_videos_own_audio_track_to_the_audio_encoder(data_root, processor):
    root, _ = data_root
    sample = next(BENCHMARKS.get("avqa")(root, num_frames=FRAMES).samples())
    assert isinstance(sample.videos[0], VideoFrames) and isinstance(sample.audios[0], AudioTrack)
    assert sample.conversation[0]["content"].startswith("<video>\n<audio>\nWhat is being cooked?\nA. pancake")
    example = processor(sample.processor_input(), generation=True)
    assert example["pixel_values_videos"].shape[0] > 0
    # the pancake clip's audio track (10.4 s) through Whisper: 50 encoder frames per second
    assert example["audio_frames_per_clip"].item() == pytest.approx(50 * 10.4, abs=10)


def test_broken_and_empty_videos_are_per_sample_errors_naming_the_path(tmp_path, processor):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    folder = tmp_path / "frames"
    folder.mkdir()
    for path in (broken, empty, folder, tmp_path / "missing.mp4"):
        sample = {"id": "s", "conversation": [{"role": "user", "content": "<video>\nWhat?"}],
                  "videos": [VideoFrames(path, FRAMES)]}
        with pytest.raises(ProcessorError, match=str(path)):
            processor(sample, generation=True)


def test_malformed_records_name_the_file_and_record(tmp_path):
    write_json(tmp_path / "DiDeMo" / "test_data.json", [{"annotation_id": 1, "video": "v.mp4", "times": [[0, 0]]}])
    with pytest.raises(DataError, match=r"test_data.json record 0: missing key\(s\) description"):
        list(BENCHMARKS.get("didemo")(tmp_path).samples())
