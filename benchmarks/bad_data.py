"""What bad samples cost: one epoch of 1000 shard samples, 10% of them crafted bad ones, against the same 900
good samples alone, through tiny-omni's real processor (decoding is CPU work: the GPU plays no part here).

  throughput_ratio : good samples per CPU second with the bad ones mixed in / without them (target >= 0.85;
                     one thread, so CPU time is the wall time of an idle machine, and a busy one does not skew it)
  peak_rss_ratio   : peak resident memory of the mixed run / of the good-only run, each measured in its own
                     subprocess (target <= 1.2)

The bad ones are decompression bombs (a PNG declaring 100000 x 100000 pixels; a real 1-bit 8000 x 8000 PNG,
64 M pixels in ~10 KB, over data.max_image_pixels and under PIL's own limit), hour-long audio (FLAC of
silence, a header that says 3600 s), float WAVs with NaN, truncated JPEGs, junk video, `.json` members that
are a list or null, and conversations with a marker but no media. Each may cost its own
decode attempt, no more: sizes and durations are read from headers. Each run reads the epoch twice and
times the second (the first pays one-time costs: imports, first calls, caches). --quick uses small media
(112-px images, 1-s clips) so that both runs and their start-up fit in about a minute.
"""
from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

from common import REPO, summary_line


# ---- the samples -------------------------------------------------------------------------------------------
def conversation(question: str, answer: str, **members: list[str]) -> bytes:
    return json.dumps({"conversation": [{"role": "user", "content": question},
                                        {"role": "assistant", "content": answer}], **members}).encode()


def good_samples(count: int, image_side: int, audio_seconds: float) -> list[tuple[str, dict[str, bytes]]]:
    """Photo crops (70%), speech clips (20%) and text (10%) from data/assets/."""
    photo = Image.open(REPO / "data/assets/coco_000000039769.png").convert("RGB")
    speech, rate = sf.read(REPO / "data/assets/LDC93S1.wav", dtype="float32")
    samples = []
    for i in range(count):
        kind = i % 10
        if kind < 7:
            buffer = io.BytesIO()
            left = (i * 37) % (photo.width - image_side)
            photo.crop((left, 0, left + image_side, image_side)).save(buffer, format="JPEG", quality=90)
            members = {"json": conversation("<image>\nWhat is in the picture?", "Two cats.", images=["img0.jpg"]),
                       "img0.jpg": buffer.getvalue()}
        elif kind < 9:
            buffer = io.BytesIO()
            sf.write(buffer, speech[: int(audio_seconds * rate)], rate, format="FLAC")
            members = {"json": conversation("<audio>\nTranscribe.", "She had your dark suit.", audios=["aud0.flac"]),
                       "aud0.flac": buffer.getvalue()}
        else:
            members = {"json": conversation(f"What is {i} plus one?", f"{i + 1}.")}
        samples.append((f"good{i:05d}", members))
    return samples


def bad_samples(count: int) -> list[tuple[str, dict[str, bytes]]]:
    """`count` crafted bad samples, cycling over the kinds of the module docstring."""
    def png(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    def declaring(width: int, height: int) -> bytes:  # a small PNG whose IHDR (CRC fixed) declares another size
        import struct
        import zlib
        data = bytearray(png(Image.new("L", (56, 56), 0)))
        data[16:24] = struct.pack(">II", width, height)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
        return bytes(data)

    hour = io.BytesIO()
    with sf.SoundFile(hour, "w", 8000, 1, format="FLAC", subtype="PCM_16") as out:
        block = np.zeros(8000 * 60, dtype=np.int16)
        for _ in range(60):
            out.write(block)
    nan_wave = np.full(16000, 0.1, dtype=np.float32)
    nan_wave[::997] = np.nan
    nan_wav = io.BytesIO()
    sf.write(nan_wav, nan_wave, 16000, subtype="FLOAT", format="WAV")
    jpeg = io.BytesIO()
    Image.new("RGB", (112, 112), "red").save(jpeg, format="JPEG")
    image_question = conversation("<image>\nWhat is it?", "A bomb.", images=["img0.png"])
    audio_question = conversation("<audio>\nWhat is it?", "Silence.", audios=["aud0.flac"])
    kinds = [
        {"json": image_question, "img0.png": declaring(100_000, 100_000)},
        {"json": image_question, "img0.png": png(Image.new("1", (8000, 8000), 0))},
        {"json": audio_question, "aud0.flac": hour.getvalue()},
        {"json": conversation("<audio>\nWhat?", "NaN.", audios=["aud0.wav"]), "aud0.wav": nan_wav.getvalue()},
        {"json": conversation("<image>\nWhat?", "Half.", images=["img0.jpg"]), "img0.jpg": jpeg.getvalue()[:200]},
        {"json": conversation("<video>\nWhat?", "Junk.", videos=["vid0.mp4"]), "vid0.mp4": b"\x00\x00\x00\x18ftyp" * 64},
        {"json": b"[1, 2, 3]"},
        {"json": b"null"},
        {"json": conversation("<image>\nWhere is the image?", "Missing.")},
    ]
    return [(f"bad{i:05d}", kinds[i % len(kinds)]) for i in range(count)]


def write_shards(directory: Path, samples: list[tuple[str, dict[str, bytes]]], per_shard: int = 250) -> None:
    directory.mkdir(parents=True)
    sizes = {}
    for start in range(0, len(samples), per_shard):
        name = f"shard-{start // per_shard:06d}.tar"
        with tarfile.open(directory / name, "w") as tar:
            for key, members in samples[start:start + per_shard]:
                for suffix, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        sizes[name] = len(samples[start:start + per_shard])
    (directory / "sizes.json").write_text(json.dumps(sizes))


# ---- one run, in its own process ------------------------------------------------------------------------------
def run_epoch(directory: Path) -> dict[str, float]:
    """The second epoch of `directory` through the real processor in this process: CPU seconds, good samples
    kept, skips by reason; and the process's peak RSS."""
    import torch

    from common import tiny_omni
    from data.pipeline import ShardStream

    torch.set_num_threads(1)
    _, _, processor = tiny_omni(torch.device("cpu"))
    import decord  # noqa: F401 -- imported at the first video either way: a one-time cost, not a per-sample one
    stream = ShardStream(directory, processor, processor.collate, batch_size=8, shuffle_buffer=0)
    timed: dict[str, object] = {}
    for batch, position in stream.stream_batches(0, None):  # a batch's position is the state after it
        if position["epoch"] == 1 and not timed:  # epoch 0 read: the timed window starts
            timed = {"started": time.process_time(), "kept": 0, "skipped_before": dict(position["skipped"])}
        elif timed:
            timed["kept"] += len(batch["ids"])
            if position["epoch"] == 2:  # one epoch's worth of batches
                break
    seconds = time.process_time() - timed["started"]
    skipped = {reason: count - timed["skipped_before"].get(reason, 0) for reason, count in position["skipped"].items()}
    return {"seconds": seconds, "kept": timed["kept"], "skipped": sum(skipped.values()), "by_reason": skipped,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def in_subprocess(directory: Path) -> dict[str, float]:
    result = subprocess.run([sys.executable, __file__, "--run", str(directory)], capture_output=True, text=True,
                            check=False)
    if result.returncode:
        raise RuntimeError(f"the run over {directory} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small media, one run each: under a minute on a CPU")
    parser.add_argument("--samples", type=int, default=1000, help="samples of the mixed epoch")
    parser.add_argument("--bad-share", type=float, default=0.1)
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)  # internal: one epoch in this process
    args = parser.parse_args()
    if args.run is not None:
        print(json.dumps(run_epoch(args.run)))
        return
    bad_count = int(args.samples * args.bad_share)
    good = good_samples(args.samples - bad_count, 112 if args.quick else 448, 1.0 if args.quick else 4.0)
    bad = bad_samples(bad_count)
    mixed = list(good)
    for i, sample in enumerate(bad):  # spread evenly through the epoch
        mixed.insert(i * len(mixed) // len(bad) + i, sample)
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(Path(tmp) / "good", good)
        write_shards(Path(tmp) / "mixed", mixed)
        repeats = 1 if args.quick else 3
        runs = {"good": [], "mixed": []}
        for _ in range(repeats):  # alternated, so a busy machine slows both alike
            for name in runs:
                runs[name].append(in_subprocess(Path(tmp) / name))
    best = {name: min(results, key=lambda r: r["seconds"]) for name, results in runs.items()}
    assert best["good"]["kept"] == best["mixed"]["kept"] == len(good) // 8 * 8, best
    rates = {name: r["kept"] / r["seconds"] for name, r in best.items()}
    print(f"{len(good)} good samples alone: {rates['good']:.1f}/s, peak RSS {best['good']['peak_rss_mb']:.0f} MB; "
          f"with {bad_count} bad ones: {rates['mixed']:.1f}/s, peak RSS {best['mixed']['peak_rss_mb']:.0f} MB; "
          f"skipped by reason: {best['mixed']['by_reason']}")
    print(summary_line("bad_data", throughput_ratio=rates["mixed"] / rates["good"],
                       peak_rss_ratio=best["mixed"]["peak_rss_mb"] / best["good"]["peak_rss_mb"]))


if __name__ == "__main__":
    main()
