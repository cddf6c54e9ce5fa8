"""The paper's video benchmarks (Table 2), each read from its public release layout under --data-root.

Frames: `PAPER_FRAMES` (128) per video, uniformly sampled (centre frame of equal segments), decoded only when
the sample's batch is processed (evaluation/video_media.py); `num_frames=` sets another count.

| benchmark | release files | prompt and scoring |
|---|---|---|
| `videomme`, `videomme-sub` | `videomme/*.parquet` + `data/<videoID>.mp4` (+ `subtitle/<videoID>.srt`) | Video-MME's official prompts (with subtitles: the lines shown at the sampled frames); `extract_characters_regex` |
| `mvbench` | `json/<task>.json` (20 tasks) + `video/<source folder>/...` (files or frame folders) | Ask-Anything `mvbench.ipynb` system prompt and question template; `check_ans`; start/end bounds sampled within |
| `longvideobench` | `lvb_val.json` + `videos/` + `subtitles/` | frames and subtitle lines interleaved in time order, then the question; `extract_characters_regex_lvb` |
| `didemo` | `test_data.json` (LocalizingMoments) + `videos/` | the span in seconds; evaluation/moment_scoring.py |
| `avqa` | `val_qa.json` (AVQA, MM'22) + `videos/<video_name>.mp4` | frames through the vision encoder, the video's own audio track through the audio encoder; option letter |
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import av
import numpy as np

from evaluation.benchmark import (BENCHMARKS, Benchmark, DataError, MissingData, Result, Sample, Score, read_json,
                                  require)
from evaluation.choice_scoring import lmms_eval_mcq_letter, vlmevalkit_choice
from evaluation.moment_scoring import PROTOCOL as MOMENT_PROTOCOL
from evaluation.moment_scoring import SEGMENT_SECONDS, parse_moment, score_moments
from evaluation.video_choice_scoring import longvideobench_index, mvbench_correct, videomme_letter
from evaluation.video_media import PAPER_FRAMES, AudioTrack, VideoFrames

VIDEO_SUFFIXES = (".mp4", ".MP4", ".mkv", ".webm", ".avi", ".mov", ".gif")
LETTERS = "ABCDEFGH"


class VideoBenchmark(Benchmark):
    modality = "video"
    max_new_tokens = 16

    def __init__(self, data_root: str | Path, protocol: str = "vlmevalkit", num_frames: int = PAPER_FRAMES) -> None:
        super().__init__(data_root, protocol)
        if num_frames < 1:
            raise ValueError(f"{self.name}: num_frames must be >= 1, got {num_frames}")
        self.num_frames = num_frames

    def frames(self, path: Path, window: tuple[float, float] | None = None) -> VideoFrames:
        return VideoFrames(path, self.num_frames, window)


def find_video(folder: Path, name: str) -> Path | None:
    """`folder/name`, or `folder/<stem of name>` with any video suffix (releases re-encode: .mov -> .mp4)."""
    exact = folder / name
    if exact.exists():
        return exact
    stem = folder / Path(name).stem
    return next((stem.with_suffix(s) for s in VIDEO_SUFFIXES if stem.with_suffix(s).is_file()), None)


def accuracy(correct: list[bool]) -> float:
    return 100.0 * sum(correct) / max(len(correct), 1)


def grouped_accuracy(results: list[Result], correct: list[bool], key: str) -> dict[str, float]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for result, ok in zip(results, correct):
        groups[str(result.meta.get(key))].append(ok)
    return {group: accuracy(values) for group, values in sorted(groups.items())}


def video_seconds(path: Path) -> float | None:
    """The container's duration from its header (None when it does not say or cannot be opened)."""
    try:
        with av.open(str(path)) as container:
            if container.duration:
                return container.duration / 1_000_000
            stream = container.streams.video[0] if container.streams.video else None
            if stream is not None and stream.duration and stream.time_base:
                return float(stream.duration * stream.time_base)
    except (av.FFmpegError, OSError, IndexError):
        return None
    return None


def frame_times(seconds: float, num_frames: int) -> list[float]:
    """The times of the frames data/media.py samples: the centres of `num_frames` equal segments."""
    return [(i + 0.5) * seconds / num_frames for i in range(num_frames)]


# ---- Video-MME ----------------------------------------------------------------------------------------
VIDEOMME_COLUMNS = ("videoID", "question_id", "question", "options", "answer", "duration", "task_type")
VIDEOMME_INSTRUCTION = ("Select the best answer to the following multiple-choice question based on the video{}. "
                        "Respond with only the letter (A, B, C, or D) of the correct option.")
_SRT_TIME = re.compile(r"(\d+):(\d+):(\d+)[,.](\d+)\s*-->\s*(\d+):(\d+):(\d+)[,.](\d+)")
_TAG = re.compile(r"<[^>]+>")


def read_srt(path: Path) -> list[tuple[float, float, str]]:
    """(start s, end s, text) of every cue of an SRT file, formatting tags (<font ...>) removed."""
    cues = []
    for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8-sig", errors="replace").strip()):
        lines = block.strip().splitlines()
        timing = next((i for i, line in enumerate(lines) if _SRT_TIME.search(line)), None)
        if timing is None:
            continue
        h1, m1, s1, f1, h2, m2, s2, f2 = _SRT_TIME.search(lines[timing]).groups()
        start = int(h1) * 3600 + int(m1) * 60 + int(s1) + int(f1) / 10 ** len(f1)
        end = int(h2) * 3600 + int(m2) * 60 + int(s2) + int(f2) / 10 ** len(f2)
        text = " ".join(_TAG.sub("", line).strip() for line in lines[timing + 1:]).strip()
        if text:
            cues.append((start, end, text))
    return cues


class _VideoMME(VideoBenchmark):
    locations = ("Video-MME", "videomme")
    release = "huggingface.co/datasets/lmms-lab/Video-MME: videomme/*.parquet, data/*.mp4 (+ subtitle/*.srt)"
    subtitles: ClassVar[bool] = False

    def samples(self) -> Iterator[Sample]:
        import pandas as pd

        root = self.locate()
        tables = sorted(root.rglob("*.parquet"))
        if not tables:
            raise MissingData(f"{self.name}: no *.parquet under {root} ({self.release})")
        for table_path in tables:
            table = pd.read_parquet(table_path)
            missing = [c for c in VIDEOMME_COLUMNS if c not in table.columns]
            if missing:
                raise DataError(f"{table_path}: missing column(s) {', '.join(missing)}")
            for row in table.to_dict("records"):
                yield self._sample(root, row)

    def _sample(self, root: Path, row: dict) -> Sample:
        video = find_video(root / "data", f"{row['videoID']}.mp4") or root / "data" / f"{row['videoID']}.mp4"
        question = "\n".join([str(row["question"]), *[str(o) for o in row["options"]]])
        instruction = VIDEOMME_INSTRUCTION.format(" and the subtitles" if self.subtitles else "")
        prompt = f"{instruction}\n{question}\nThe best answer is:"
        if self.subtitles:
            prompt = f"This video's subtitles are listed below:\n{self._subtitles(root, row, video)}\n{prompt}"
        meta = {k: str(row.get(k)) for k in ("duration", "domain", "sub_category", "task_type", "videoID")}
        return Sample(id=str(row["question_id"]), conversation=[{"role": "user", "content": f"<video>\n{prompt}"}],
                      answer=str(row["answer"]).strip(), videos=[self.frames(video)], meta=meta)

    def _subtitles(self, root: Path, row: dict, video: Path) -> str:
        """The cues shown at the sampled frames (as the official "w/ subs" setting and lmms-eval take them)."""
        path = root / "subtitle" / f"{row['videoID']}.srt"
        cues = read_srt(path) if path.is_file() else []
        if not cues:
            return "No subtitles available"
        seconds = video_seconds(video)
        if seconds is None:  # the video cannot be opened: its sample fails anyway; show every cue
            return "\n".join(text for _, _, text in cues)
        times = frame_times(seconds, self.num_frames)
        shown = [text for start, end, text in cues if any(start <= t < end for t in times)]
        return "\n".join(shown) if shown else "No subtitles available"

    def score(self, results: list[Result]) -> Score:
        letters = [videomme_letter(r.prediction) for r in results]
        correct = [letter == str(r.answer).strip() for letter, r in zip(letters, results)]
        return Score(benchmark=self.name, metric="accuracy (%)", value=accuracy(correct),
                     protocol="Video-MME official prompt + extract_characters_regex" +
                              (" (subtitles at the sampled frames)" if self.subtitles else ""),
                     categories=grouped_accuracy(results, correct, "duration"), count=len(results),
                     unparsed=sum(letter is None and r.prediction is not None for letter, r in zip(letters, results)),
                     extra={"task_type": grouped_accuracy(results, correct, "task_type")})


@BENCHMARKS.register("videomme")
class VideoMME(_VideoMME):
    subtitles = False


@BENCHMARKS.register("videomme-sub")
class VideoMMESubtitles(_VideoMME):
    subtitles = True


# ---- MVBench --------------------------------------------------------------------------------------------
# task -> its source folders under video/: the official release's (with start/end bounds applied) first, then
# the pre-cut segments of the `video` revision lmms-eval reads (bounds already applied by cutting).
MVBENCH_TASKS: dict[str, tuple[tuple[str, bool], ...]] = {
    "action_sequence": (("star/Charades_v1_480", True), ("star/Charades_segment", False)),
    "action_prediction": (("star/Charades_v1_480", True), ("star/Charades_segment", False)),
    "action_antonym": (("ssv2_video", False), ("ssv2_video_mp4", False)),
    "fine_grained_action": (("Moments_in_Time_Raw/videos", False),),
    "unexpected_action": (("FunQA_test/test", False),),
    "object_existence": (("clevrer/video_validation", False),),
    "object_interaction": (("star/Charades_v1_480", True), ("star/Charades_segment", False)),
    "object_shuffle": (("perception/videos", False),),
    "moving_direction": (("clevrer/video_validation", False),),
    "action_localization": (("sta/sta_video", True), ("sta/sta_video_segment", False)),
    "scene_transition": (("scene_qa/video", False),),
    "action_count": (("perception/videos", False),),
    "moving_count": (("clevrer/video_validation", False),),
    "moving_attribute": (("clevrer/video_validation", False),),
    "state_change": (("perception/videos", False),),
    "fine_grained_pose": (("nturgbd", False), ("nturgbd_convert", False)),
    "character_order": (("perception/videos", False),),
    "egocentric_navigation": (("vlnqa", False),),
    "episodic_reasoning": (("tvqa/frames_fps3_hq", True), ("tvqa/video_fps3_hq_segment", False)),
    "counterfactual_inference": (("clevrer/video_validation", False),),
}
MVBENCH_SYSTEM = ("Carefully watch the video and pay attention to the cause and sequence of events, the detail and "
                  "movement of objects, and the action and pose of persons. Based on your observations, select the "
                  "best option that accurately addresses the question.")


@BENCHMARKS.register("mvbench")
class MVBench(VideoBenchmark):
    locations = ("MVBench",)
    release = "huggingface.co/datasets/OpenGVLab/MVBench: json/*.json + video/ (unzipped)"

    def samples(self) -> Iterator[Sample]:
        root = self.locate()
        for task, folders in MVBENCH_TASKS.items():
            path = root / "json" / f"{task}.json"
            if not path.is_file():
                raise MissingData(f"{self.name}: {path} not found (the release has 20 task files: "
                                  f"{', '.join(MVBENCH_TASKS)})")
            records = read_json(path)
            for index, record in enumerate(records):
                require(record, ("video", "question", "candidates", "answer"), f"{path} record {index}")
                yield self._sample(root, task, folders, index, record, path)

    def _sample(self, root: Path, task: str, folders, index: int, record: dict, path: Path) -> Sample:
        candidates = [str(c) for c in record["candidates"]]
        if record["answer"] not in candidates:
            raise DataError(f"{path} record {index}: answer {record['answer']!r} is not among its candidates")
        truth = f"({LETTERS[candidates.index(record['answer'])]}) {record['answer']}"
        options = "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(candidates))
        video, bounded = root / "video" / folders[0][0] / record["video"], folders[0][1]
        for folder, uses_bound in folders:
            found = find_video(root / "video" / folder, record["video"])
            if found is not None:
                video, bounded = found, uses_bound
                break
        window = (float(record["start"]), float(record["end"])) if bounded and "start" in record else None
        question = f"Question: {record['question']}\nOptions:\n{options}\nOnly give the best option."
        return Sample(id=f"{task}/{index}", answer=truth, videos=[self.frames(video, window)],
                      conversation=[{"role": "system", "content": MVBENCH_SYSTEM},
                                    {"role": "user", "content": f"<video>\n{question}"}],
                      meta={"task": task})

    def score(self, results: list[Result]) -> Score:
        correct = [mvbench_correct(r.prediction, str(r.answer)) for r in results]
        return Score(benchmark=self.name, protocol="MVBench official (Ask-Anything mvbench.ipynb): check_ans",
                     metric="accuracy (%)", value=accuracy(correct), count=len(results),
                     categories=grouped_accuracy(results, correct, "task"))


# ---- LongVideoBench -------------------------------------------------------------------------------------
LVB_KEYS = ("id", "video_path", "question", "candidates", "correct_choice", "duration")


def read_lvb_subtitles(path: Path, offset: float) -> list[tuple[float, float, str]]:
    """LongVideoBench subtitle JSON: `{"start": "HH:MM:SS.mmm", "end": ..., "line": ...}` or
    `{"timestamp": [start, end], "text": ...}` entries; times made relative to the clip's start."""
    def seconds(value: Any) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        parts = [float(p) for p in str(value).replace(",", ".").split(":")]
        return sum(p * 60 ** i for i, p in enumerate(reversed(parts)))

    cues = []
    for index, entry in enumerate(read_json(path)):
        if "timestamp" in entry:
            start, end = (seconds(t) if t is not None else math.inf for t in entry["timestamp"])
            text = entry.get("text", "")
        elif "start" in entry and "end" in entry:
            start, end, text = seconds(entry["start"]), seconds(entry["end"]), entry.get("line", "")
        else:
            raise DataError(f"{path} entry {index}: needs 'start'/'end'/'line' or 'timestamp'/'text'")
        if str(text).strip():
            cues.append((start - offset, end - offset, str(text).strip()))
    return cues


@BENCHMARKS.register("longvideobench")
class LongVideoBench(VideoBenchmark):
    locations = ("LongVideoBench",)
    release = "huggingface.co/datasets/longvideobench/LongVideoBench: lvb_val.json, videos/, subtitles/"

    def samples(self) -> Iterator[Sample]:
        root = self.locate()
        path = root / "lvb_val.json"
        for index, record in enumerate(read_json(path)):
            require(record, LVB_KEYS, f"{path} record {index}")
            yield self._sample(root, record, f"{path} record {index}")

    def _sample(self, root: Path, record: dict, where: str) -> Sample:
        video = find_video(root / "videos", record["video_path"]) or root / "videos" / record["video_path"]
        seconds = float(record["duration"])
        cues = []
        if record.get("subtitle_path"):
            subtitle = root / "subtitles" / record["subtitle_path"]
            if subtitle.is_file():
                cues = read_lvb_subtitles(subtitle, float(record.get("starting_timestamp_for_subtitles") or 0))
        parts, videos = self._interleave(video, seconds, cues)
        options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(record["candidates"]))
        content = "\n".join([*parts, str(record["question"]), options,
                             "Answer with the option's letter from the given choices directly."])
        meta = {k: record.get(k) for k in ("duration_group", "question_category", "topic_category", "level")}
        return Sample(id=str(record["id"]), conversation=[{"role": "user", "content": content}],
                      answer=int(record["correct_choice"]), videos=videos, meta=meta)

    def _interleave(self, video: Path, seconds: float, cues: list) -> tuple[list[str], list[VideoFrames]]:
        """Frames and subtitle lines in time order: each cue goes after the last frame before its midpoint;
        the frames between two cues form one `<video>` span sampled within their time window."""
        times = frame_times(seconds, self.num_frames)
        step = seconds / self.num_frames
        after: dict[int, list[str]] = defaultdict(list)  # frame index -> cues after it (-1: before the first)
        for start, end, text in cues:
            middle = (start + min(end, seconds)) / 2
            after[int(np.searchsorted(times, middle, side="right")) - 1].append(text)
        parts, videos = list(after.get(-1, [])), []
        first = 0
        for index in range(len(times)):
            if index in after or index == len(times) - 1:
                window = (times[first] - step / 2, times[index] + step / 2)
                videos.append(VideoFrames(video, index - first + 1, window))
                parts.append("<video>")
                parts.extend(after.get(index, []))
                first = index + 1
        return parts, videos

    def score(self, results: list[Result]) -> Score:
        chosen = [longvideobench_index(r.prediction) for r in results]
        correct = [c == int(r.answer) for c, r in zip(chosen, results)]
        return Score(benchmark=self.name, protocol="LongVideoBench official: interleaved subtitles, "
                     "extract_characters_regex_lvb", metric="accuracy (%)", value=accuracy(correct),
                     count=len(results), categories=grouped_accuracy(results, correct, "duration_group"),
                     unparsed=sum(c is None and r.prediction is not None for c, r in zip(chosen, results)),
                     extra={"question_category": grouped_accuracy(results, correct, "question_category")})


# ---- DiDeMo ----------------------------------------------------------------------------------------------
DIDEMO_PROMPT = ("The video is cut into {segments} segments of 5 seconds ({seconds:g} seconds in all). During which "
                 "seconds of the video does this happen: \"{description}\"? Answer with the start and end time in "
                 "seconds, as \"start - end\".")


@BENCHMARKS.register("didemo")
class DiDeMo(VideoBenchmark):
    locations = ("DiDeMo", "didemo")
    release = "github.com/LisaAnne/LocalizingMoments: data/test_data.json + the videos (download_videos_AWS.py)"

    def samples(self) -> Iterator[Sample]:
        root = self.locate()
        path = root / "test_data.json"
        for index, record in enumerate(read_json(path)):
            require(record, ("annotation_id", "description", "video", "times"), f"{path} record {index}")
            segments = int(record.get("num_segments") or 6)
            seconds = segments * SEGMENT_SECONDS  # annotations cover the first 30 s (25 s for short videos)
            video = find_video(root / "videos", record["video"]) or root / "videos" / record["video"]
            prompt = DIDEMO_PROMPT.format(segments=segments, seconds=seconds, description=record["description"])
            yield Sample(id=str(record["annotation_id"]), conversation=[{"role": "user", "content": f"<video>\n{prompt}"}],
                         answer=[list(map(int, t)) for t in record["times"]], videos=[self.frames(video, (0.0, seconds))],
                         meta={"num_segments": segments})

    def score(self, results: list[Result]) -> Score:
        moments = [parse_moment(r.prediction or "", "seconds", int(r.meta.get("num_segments", 6))) for r in results]
        scores = score_moments(moments, [[tuple(t) for t in r.answer] for r in results])
        return Score(benchmark=self.name, protocol=MOMENT_PROTOCOL, metric="R@1, IoU=0.5 (%)",
                     value=100 * scores["R@1,IoU=0.5"], count=len(results),
                     unparsed=sum(m is None and r.prediction is not None for m, r in zip(moments, results)),
                     categories={"R@1,IoU=0.7": 100 * scores["R@1,IoU=0.7"], "mIoU": 100 * scores["mIoU"]},
                     extra={"rank@1 (official exact moment)": 100 * scores["rank@1"]})


# ---- AVQA -----------------------------------------------------------------------------------------------
@BENCHMARKS.register("avqa")
class AVQA(VideoBenchmark):
    locations = ("AVQA",)
    release = "AVQA (Yang et al., ACM MM 2022): val_qa.json + the VGGSound clips in videos/"

    def samples(self) -> Iterator[Sample]:
        root = self.locate()
        path = root / "val_qa.json"
        for index, record in enumerate(read_json(path)):
            require(record, ("id", "video_name", "question_text", "multi_choice", "answer"), f"{path} record {index}")
            video = find_video(root / "videos", f"{record['video_name']}.mp4") or root / "videos" / f"{record['video_name']}.mp4"
            options = {LETTERS[i]: str(c) for i, c in enumerate(record["multi_choice"])}
            text = "\n".join([str(record["question_text"]), *[f"{k}. {v}" for k, v in options.items()],
                              "Answer with the option's letter from the given choices directly."])
            yield Sample(id=str(record["id"]), conversation=[{"role": "user", "content": f"<video>\n<audio>\n{text}"}],
                         answer=LETTERS[int(record["answer"])], videos=[self.frames(video)], audios=[AudioTrack(video)],
                         meta={"options": options, "question_type": record.get("question_type"),
                               "question_relation": record.get("question_relation")})

    def score(self, results: list[Result]) -> Score:
        if self.protocol == "lmms-eval":
            chosen = [lmms_eval_mcq_letter(r.prediction, tuple(r.meta["options"])) or None for r in results]
            rule = "lmms-eval extract_mcq_answer"
        else:
            chosen = [vlmevalkit_choice(r.prediction, r.meta["options"]) if r.prediction is not None else None
                      for r in results]
            rule = "VLMEvalKit can_infer (exact matching)"
        correct = [c == r.answer for c, r in zip(chosen, results)]
        return Score(benchmark=self.name, protocol=f"AVQA accuracy; option extraction: {rule}", metric="accuracy (%)",
                     value=accuracy(correct), count=len(results),
                     unparsed=sum(c is None and r.prediction is not None for c, r in zip(chosen, results)),
                     categories=grouped_accuracy(results, correct, "question_type"))
