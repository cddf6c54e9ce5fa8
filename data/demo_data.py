"""The demo dataset, built offline in seconds: media with known answers, as shards plus a held-out manifest.

- images drawn with PIL: coloured shapes to count and name, and rendered words to read (OCR-style);
- audio: the real speech clips of data/assets/ with their reference transcripts, generated tone
  sequences ("three beeps"), and synthetic speech from `espeak-ng` when it is installed;
- videos encoded with PyAV: a square moving left to right or right to left;
- text-only question/answer pairs.
The train split is written as WebDataset shards (data/shards.py); the eval split is a JSONL manifest
with its media and answers, for the tier probe and evaluation to read.

The output directory must be empty or one this builder wrote before (its marker `.make_demo_data.json`
lists every file it wrote), unless `overwrite`; a rebuild deletes only files the marker lists.
"""
from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import av
import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

from data.shards import write_shards

MARKER = ".make_demo_data.json"
MEDIA_FIELDS = ("image", "audio", "video")

ASSETS = Path(__file__).resolve().parent / "assets"
SPEECH = {  # data/assets/LICENSES.txt: reference transcripts
    "LDC93S1.wav": "She had your dark suit in greasy wash water all year.",
    "1272-128104-0000.flac": "MISTER QUILTER IS THE APOSTLE OF THE MIDDLE CLASSES AND WE ARE GLAD TO WELCOME HIS GOSPEL",
    "sense_and_sensibility_0880.wav": "he was not an ill disposed young man",
}
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}
WORDS = ["MOE", "TIER", "RANK", "LING", "OMNI", "EXPERT"]
NUMBERS = ["zero", "one", "two", "three", "four", "five"]
SENTENCES = ["the red square moves to the left", "three blue circles on a white page", "experts are ranked by score",
             "the quick brown fox jumps over the lazy dog", "mixture of experts models route every token"]


def _turn(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _shapes_image(path: Path, rng: random.Random) -> tuple[str, str]:
    colour, count = rng.choice(list(COLOURS)), rng.randint(1, 4)
    image = Image.new("RGB", (224, 224), "white")
    draw = ImageDraw.Draw(image)
    for i in range(count):
        x, y = 20 + (i % 2) * 100, 20 + (i // 2) * 100
        draw.ellipse([x, y, x + 70, y + 70], fill=COLOURS[colour])
    image.save(path)
    return f"<image>\nHow many {colour} circles are there?", NUMBERS[count]


def _text_image(path: Path, rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    image = Image.new("RGB", (224, 112), "white")
    ImageDraw.Draw(image).text((20, 40), word, fill="black", font_size=40)
    image.save(path)
    return "<image>\nWhat word is written in the image?", word


def _beeps(path: Path, rng: random.Random) -> tuple[str, str]:
    count, rate = rng.randint(1, 4), 16000
    tone = np.sin(2 * np.pi * 880 * np.arange(int(0.15 * rate)) / rate) * 0.5
    gap = np.zeros(int(0.2 * rate))
    sf.write(path, np.concatenate([np.concatenate([tone, gap]) for _ in range(count)]).astype(np.float32), rate)
    return "<audio>\nHow many beeps do you hear?", NUMBERS[count]


def _espeak_speech(path: Path, rng: random.Random) -> tuple[str, str]:
    sentence = rng.choice(SENTENCES)
    try:
        subprocess.run(["espeak-ng", "-v", "en", "-s", "150", "-w", str(path), sentence], check=True,
                       capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(f"espeak-ng failed on {sentence!r}: {err}") from err
    return "<audio>\nTranscribe the speech.", sentence


def _moving_square(path: Path, rng: random.Random, frames: int = 16) -> tuple[str, str]:
    rightwards = rng.random() < 0.5
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for t in range(frames):
            frame = np.full((64, 96, 3), 255, np.uint8)
            x = int((t if rightwards else frames - 1 - t) * (96 - 16) / (frames - 1))
            frame[24:40, x:x + 16] = (200, 30, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return "<video>\nWhich way does the red square move?", "left to right" if rightwards else "right to left"


class DemoDirectoryError(ValueError):
    """The output directory holds files this builder did not write."""


def build_demo_data(out_dir: str | Path, samples_per_kind: int = 12, eval_fraction: float = 0.25,
                    seed: int = 0, overwrite: bool = False) -> dict[str, Path]:
    """Write `media/`, `train_shards/` (+ sizes.json, stats.json), `train.jsonl` and `eval.jsonl`."""
    if samples_per_kind < 1 or not 0 < eval_fraction < 1:
        raise ValueError(f"samples_per_kind must be >= 1 and eval_fraction in (0, 1), got {samples_per_kind}, "
                         f"{eval_fraction}")
    out, rng = Path(out_dir), random.Random(seed)
    previous = _claim(out, overwrite)
    media = out / "media"
    media.mkdir(parents=True, exist_ok=True)
    _write_marker(out, sorted(previous))  # a crash mid-build still marks what may be ours
    records = []
    makers = {"shapes": (_shapes_image, ".png", "image"), "ocr": (_text_image, ".png", "image"),
              "beeps": (_beeps, ".wav", "audio"), "motion": (_moving_square, ".mp4", "video")}
    if shutil.which("espeak-ng"):
        makers["tts"] = (_espeak_speech, ".wav", "audio")
    for kind, (make, suffix, field) in makers.items():
        for i in range(samples_per_kind):
            name = f"{kind}_{i:03d}{suffix}"
            question, answer = make(media / name, rng)
            records.append({"id": f"{kind}-{i:03d}", field: f"media/{name}", "conversation": _turn(question, answer),
                            "answer": answer})
    for name, transcript in SPEECH.items():
        shutil.copy(ASSETS / name, media / name)
        records.append({"id": f"speech-{Path(name).stem}", "audio": f"media/{name}",
                        "conversation": _turn("<audio>\nTranscribe the speech.", transcript), "answer": transcript})
    for a, b in [(2, 3), (4, 1), (5, 0), (1, 1)]:
        total = NUMBERS[a + b] if a + b < len(NUMBERS) else str(a + b)
        records.append({"id": f"text-{a}-{b}", "conversation": _turn(f"What is {NUMBERS[a]} plus {NUMBERS[b]}?", total),
                        "answer": total})
    rng.shuffle(records)
    held = max(1, int(len(records) * eval_fraction))
    (out / "eval.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records[:held]) + "\n")
    (out / "train.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records[held:]) + "\n")
    write_shards(out / "train.jsonl", out / "train_shards", max_samples=16, overwrite=True, show_progress=False)
    (out / "LICENSES.txt").write_text("Generated media: no licence restrictions. Speech clips copied from "
                                      "data/assets/ (see data/assets/LICENSES.txt for their origins and licences).\n")
    written = {"train.jsonl", "eval.jsonl", "LICENSES.txt"} | {r[f] for r in records for f in MEDIA_FIELDS if f in r}
    for stale in set(previous) - written:  # an earlier, larger build's media (the marker lists them as ours)
        (out / stale).unlink(missing_ok=True)
    _write_marker(out, sorted(written))
    return {"train_shards": out / "train_shards", "train": out / "train.jsonl", "eval": out / "eval.jsonl"}


def _claim(out: Path, overwrite: bool) -> list[str]:
    """Files (relative paths) an earlier build left in `out`; refuses a directory holding anything else."""
    if out.exists() and not out.is_dir():
        raise DemoDirectoryError(f"{out} is a file, not a directory")
    if not out.exists():
        return []
    try:
        ours = json.loads((out / MARKER).read_text())["files"] if (out / MARKER).is_file() else []
    except (json.JSONDecodeError, KeyError, TypeError):
        raise DemoDirectoryError(f"{out / MARKER} is damaged; choose another directory") from None
    mine = set(ours) | {"media", "train_shards", MARKER}
    others = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                    if str(p.relative_to(out)) not in mine and p.parent.name != "train_shards")
    if others and not overwrite:
        raise DemoDirectoryError(f"{out} holds files make_demo_data did not write ({', '.join(others[:3])}); choose "
                                 f"an empty directory or overwrite (they are kept, never deleted)")
    return ours


def _write_marker(out: Path, files: list[str]) -> None:
    tmp = out / f"{MARKER}.tmp"
    tmp.write_text(json.dumps({"tool": "make_demo_data", "files": files}, indent=1))
    tmp.replace(out / MARKER)
