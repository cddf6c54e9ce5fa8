"""Crafted bad shards, one row per case: the stream (through tiny-omni's real processor) keeps every good sample,
and the skip tally names each bad sample (shard and key) and its reason. Plus one real `tools.train` run."""
from __future__ import annotations

import gzip
import io
import json
import struct
import subprocess
import sys
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import av
import numpy as np
import pytest
import soundfile as sf
import yaml
from PIL import Image

from data.loader import StreamLoader
from data.media import MediaLimits, media_limits
from data.pipeline import ShardStream, to_sample

ROOT = Path(__file__).resolve().parents[2]


# ---- crafted media ------------------------------------------------------------------------------------------
def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def blue_png(width: int = 56, height: int = 56) -> bytes:
    return png(Image.new("RGB", (width, height), (20, 40, 200)))


def png_declaring(width: int, height: int) -> bytes:
    """A valid 56x56 PNG whose IHDR (CRC fixed) declares another size: a bomb that costs nothing to craft."""
    data = bytearray(png(Image.new("L", (56, 56), 0)))
    ihdr = bytearray(data[12:29])  # type + 13 bytes of IHDR data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def real_bomb() -> bytes:
    """A real 1-bit 8000 x 8000 PNG (64 M pixels, 8 MB raw, ~10 KB of file): over max_image_pixels, under PIL's limit."""
    return png(Image.new("1", (8000, 8000), 0))


def wav(samples: np.ndarray, rate: int = 16000, subtype: str = "FLOAT", fmt: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, subtype=subtype, format=fmt)
    return buffer.getvalue()


def tone(seconds: float = 0.5, rate: int = 16000, channels: int = 1) -> np.ndarray:
    wave = 0.3 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate)) / rate).astype(np.float32)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def with_value(value: float) -> bytes:
    wave = tone()
    wave[100:103] = value
    return wav(wave)


def silence_flac(seconds: int) -> bytes:
    """A long clip of silence, written in blocks (FLAC stores silence in a few bytes per block)."""
    buffer = io.BytesIO()
    with sf.SoundFile(buffer, "w", 8000, 1, format="FLAC", subtype="PCM_16") as out:
        block = np.zeros(8000 * 60, dtype=np.int16)
        for _ in range(seconds // 60):
            out.write(block)
    return buffer.getvalue()


def mp4(frames: int = 4, rate: int = 4, fmt: str = "mp4") -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()  # the header is written even when no frame follows
        for i in range(frames):
            frame = np.full((48, 64, 3), 30 * i, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def float_tiff_with_nan() -> bytes:
    values = np.full((56, 56), 0.5, dtype=np.float32)
    values[3, 3] = np.nan
    buffer = io.BytesIO()
    Image.fromarray(values, mode="F").save(buffer, format="TIFF")
    return buffer.getvalue()


def conversation(question: str, answer: str = "Blue.", **extra) -> bytes:
    return json.dumps({"conversation": [{"role": "user", "content": question},
                                        {"role": "assistant", "content": answer}], **extra}).encode()


def image_sample(image: bytes, member: str = "img0.png") -> dict[str, bytes]:
    return {"json": conversation("<image>\nWhat colour?", images=[member]), member: image}


def audio_sample(audio: bytes, member: str = "aud0.wav") -> dict[str, bytes]:
    return {"json": conversation("<audio>\nWhat is it?", "A tone.", audios=[member]), member: audio}


def video_sample(video: bytes) -> dict[str, bytes]:
    return {"json": conversation("<video>\nWhat happens?", "It brightens.", videos=["vid0.mp4"]), "vid0.mp4": video}


# ---- crafted shards -------------------------------------------------------------------------------------------
GOOD = [f"good{i}" for i in range(3)]


def write_tar(path: Path, groups: list[tuple[str, dict[str, bytes]]]) -> dict[str, int]:
    """Groups in order (good0, good1, the case's groups, good2); returns each key's first header offset."""
    offsets: dict[str, int] = {}
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in groups:
            for suffix, data in members.items():
                offsets.setdefault(key, tar.offset)
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    return offsets


def good_groups() -> list[tuple[str, dict[str, bytes]]]:
    return [(key, image_sample(blue_png())) for key in GOOD]


@dataclass
class Case:
    name: str
    groups: Callable[[], list[tuple[str, dict[str, bytes]]]]  # the case's own groups, between good1 and good2
    reason: str | None  # the expected skip reason; None: the samples are kept
    damage: Callable[[Path, dict[str, int]], Path] | None = None  # shard file -> the damaged shard file
    limits: MediaLimits | None = None
    kept: list[str] = field(default_factory=lambda: list(GOOD))  # keys that must arrive


def one(members: Callable[[], dict[str, bytes]]) -> Callable[[], list[tuple[str, dict[str, bytes]]]]:
    return lambda: [("bad", members())]


def corrupt_header(shard: Path, offsets: dict[str, int]) -> Path:
    data = bytearray(shard.read_bytes())
    data[offsets["bad"]:offsets["bad"] + 512] = b"\x5a" * 512
    shard.write_bytes(bytes(data))
    return shard


def truncate_in_bad(shard: Path, offsets: dict[str, int]) -> Path:
    shard.write_bytes(shard.read_bytes()[:offsets["bad"] + 700])
    return shard


def gzip_with_bad_crc(shard: Path, offsets: dict[str, int]) -> Path:
    packed = bytearray(gzip.compress(shard.read_bytes()))
    packed[-8] ^= 0xFF  # the CRC32 in the trailer: the inflated bytes no longer match it
    shard.unlink()
    target = shard.with_name(shard.name + ".gz")
    target.write_bytes(bytes(packed))
    return target


def gzip_truncated(shard: Path, offsets: dict[str, int]) -> Path:
    """A .tar.gz cut inside the bad sample: the deflate stream flushed there, and nothing after it."""
    data = shard.read_bytes()
    deflater = zlib.compressobj(wbits=zlib.MAX_WBITS | 16)
    packed = deflater.compress(data[:offsets["bad"] + 700]) + deflater.flush(zlib.Z_SYNC_FLUSH)
    shard.unlink()
    target = shard.with_name(shard.name + ".gz")
    target.write_bytes(packed)
    return target


def not_a_tar(shard: Path, offsets: dict[str, int]) -> Path:
    shard.write_bytes(b"this is not a tar archive " * 40)
    return shard


def twelve_images() -> dict[str, bytes]:
    """img0 .. img11 of 12 distinct sizes (the processor's image grids give their order back)."""
    members = {f"img{i}.png": blue_png(56 * (1 + i % 4), 56 * (1 + i // 4)) for i in range(12)}
    question = "".join("<image>" for _ in range(12)) + "\nHow many?"
    return {"json": conversation(question, "Twelve."), **members}  # no listing: the member index decides


def twelve_listed() -> dict[str, bytes]:
    members = twelve_images()
    record = json.loads(members["json"])
    record["images"] = [f"img{i}.png" for i in reversed(range(12))]  # an explicit order wins over the index
    return {**members, "json": json.dumps(record).encode()}


CASES = [
    # images
    Case("truncated_png", one(lambda: image_sample(blue_png()[:60])), "undecodable_image"),
    Case("bomb_header_png", one(lambda: image_sample(png_declaring(100_000, 100_000))), "image_too_large"),
    Case("real_bomb_under_pil_limit", one(lambda: image_sample(real_bomb())), "image_too_large"),
    Case("not_an_image", one(lambda: image_sample(b"GIF89a but not really" * 3)), "undecodable_image"),
    Case("empty_image_member", one(lambda: image_sample(b"")), "empty_file"),
    Case("float_tiff_with_nan", one(lambda: image_sample(float_tiff_with_nan(), "img0.tiff")), "image_non_finite"),
    Case("16bit_greyscale_kept", one(lambda: image_sample(png(Image.fromarray(np.full((56, 56), 40000, np.uint16))))),
         None, kept=GOOD + ["bad"]),
    Case("palette_kept", one(lambda: image_sample(png(Image.new("RGB", (56, 56), (200, 10, 10)).quantize(4)))),
         None, kept=GOOD + ["bad"]),
    # audio
    Case("float_wav_with_nan", one(lambda: audio_sample(with_value(np.nan))), "audio_non_finite"),
    Case("float_wav_with_inf", one(lambda: audio_sample(with_value(np.inf))), "audio_non_finite"),
    Case("hour_long_clip", one(lambda: audio_sample(silence_flac(3600), "aud0.flac")), "audio_too_long"),
    Case("not_audio", one(lambda: audio_sample(b"RIFF\x00\x00junk" * 20)), "undecodable_audio"),
    Case("audio_without_samples", one(lambda: audio_sample(wav(np.zeros((0, 1), np.float32)))), "audio_empty"),
    Case("8k_stereo_and_48k_3ch_kept", lambda: [("bad", audio_sample(wav(tone(0.5, 8000, 2), 8000))),
                                                ("bad2", audio_sample(wav(tone(0.5, 48000, 3), 48000)))],
         None, kept=GOOD + ["bad", "bad2"]),
    # video
    Case("video_without_frames", one(lambda: video_sample(mp4(frames=0, fmt="matroska"))), "undecodable_video"),
    Case("broken_video_stream", one(lambda: video_sample(mp4()[:300])), "undecodable_video"),
    Case("not_a_video", one(lambda: video_sample(b"\x00\x00\x00\x18ftypjunk" * 30)), "undecodable_video"),
    Case("video_longer_than_allowed", one(lambda: video_sample(mp4(frames=8, rate=1))), "video_too_long",
         limits=MediaLimits(max_video_seconds=4.0)),
    Case("video_kept", one(lambda: video_sample(mp4())), None, kept=GOOD + ["bad"]),
    # JSON shapes
    Case("json_list", one(lambda: {"json": b"[1, 2]", "img0.png": blue_png()}), "bad_json"),
    Case("json_string", one(lambda: {"json": b'"hello"', "img0.png": blue_png()}), "bad_json"),
    Case("json_null", one(lambda: {"json": b"null", "img0.png": blue_png()}), "bad_json"),
    Case("json_not_json", one(lambda: {"json": b"{conversation:", "img0.png": blue_png()}), "bad_json"),
    Case("caption_is_a_number", one(lambda: {"json": b'{"caption": 7}', "img0.png": blue_png()}), "bad_json"),
    Case("no_conversation_or_caption", one(lambda: {"json": b'{"url": "x"}', "img0.png": blue_png()}), "no_text"),
    Case("caption_txt_not_utf8", one(lambda: {"txt": b"\xff\xfe\xfa", "img0.png": blue_png()}), "bad_text_encoding"),
    Case("conversation_is_a_string", one(lambda: {"json": b'{"conversation": "hi"}'}), "bad_conversation"),
    Case("turn_without_content", one(lambda: {"json": b'{"conversation": [{"role": "user"}]}'}), "bad_conversation"),
    Case("marker_without_media", one(lambda: {"json": conversation("<image>\nWhat colour?")}), "placeholder_mismatch"),
    Case("listed_member_missing", one(lambda: {"json": conversation("<image>\nWhat?", images=["img3.png"]),
                                               "img0.png": blue_png()}), "missing_member"),
    Case("answer_too_long", one(lambda: {"json": conversation("Say it.", "word " * 2000)}), "too_long"),
    # tar damage
    Case("corrupt_header_mid_shard", one(lambda: image_sample(blue_png())), "tar_damage", damage=corrupt_header),
    Case("truncated_tar", one(lambda: image_sample(blue_png())), "tar_truncated", damage=truncate_in_bad,
         kept=GOOD[:2]),
    Case("gzip_crc_error", one(lambda: image_sample(blue_png())), "gzip_crc", damage=gzip_with_bad_crc, kept=[]),
    Case("gzip_truncated", one(lambda: image_sample(blue_png())), "gzip_damage", damage=gzip_truncated,
         kept=GOOD[:2]),
    Case("not_a_tar", one(lambda: image_sample(blue_png())), "not_a_tar", damage=not_a_tar, kept=[]),
    Case("duplicate_key", lambda: [("bad", image_sample(blue_png())), ("spacer", image_sample(blue_png())),
                                   ("bad", image_sample(blue_png()))], "duplicate_key", kept=GOOD + ["bad", "spacer"]),
    Case("duplicate_member", lambda: [("bad", image_sample(blue_png())), ("bad", {"img0.png": blue_png()})],
         "duplicate_key"),
    # order of many media
    Case("twelve_images_in_index_order", one(twelve_images), None, kept=GOOD + ["bad"]),
]


def build(case: Case, directory: Path) -> Path:
    directory.mkdir()
    groups = good_groups()[:2] + case.groups() + good_groups()[2:]
    shard = directory / "shard-000000.tar"
    offsets = write_tar(shard, groups)
    keys = list(dict.fromkeys(key for key, _ in groups))
    shard = case.damage(shard, offsets) if case.damage else shard
    (directory / "sizes.json").write_text(json.dumps({shard.name: len(keys) if case.name != "duplicate_key"
                                                      else len(groups)}))
    return directory


def read_epoch(directory: Path, processor, limits: MediaLimits, kept: int):
    """The epoch's batches of one sample each, and the loader (its skip tally)."""
    stream = ShardStream(directory, processor, processor.collate, batch_size=1, limits=limits)
    loader = StreamLoader(stream)
    batches = []
    for batch, position in stream.stream_batches(0, None):  # the stream itself: its positions tell the epoch
        loader.positions[0] = position
        if position["epoch"] > 0 and position.get("shard_index", 0) == 0 and len(batches) >= kept:
            break
        batches.append(batch)
        if len(batches) > kept + 3:
            break
    return batches, loader


@pytest.fixture(scope="module")
def limits(processor) -> MediaLimits:
    return media_limits(processor)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_sample_is_skipped_named_and_counted(case, tmp_path, processor, limits):
    directory = build(case, tmp_path / "shards")
    if not case.kept:  # nothing readable: the stream says so, naming the damage
        with pytest.raises(ValueError, match=f"gave no batch.*{case.reason}"):
            read_epoch(directory, processor, case.limits or limits, 0)
        return
    batches, loader = read_epoch(directory, processor, case.limits or limits, len(case.kept))
    ids = [batch["ids"][0] for batch in batches]
    assert set(case.kept) <= set(ids), (case.name, ids, dict(loader.skipped), loader.last_skip)
    if case.reason is None:
        assert not loader.skipped, loader.last_skip
        return
    assert case.reason in loader.skipped, (dict(loader.skipped), loader.last_skip)
    assert "shard-000000.tar" in loader.last_skip
    if case.damage is None:
        assert "bad" in loader.last_skip  # the key is named
        assert ids.count("bad") == ("bad" in case.kept)  # the bad sample left out (a duplicate: its second copy)
    if case.damage in (truncate_in_bad, gzip_truncated, corrupt_header):
        assert "byte" in loader.last_skip  # where in the shard


def test_samples_before_and_after_a_corrupt_header_are_kept_and_losses_counted(tmp_path, processor, limits):
    case = next(c for c in CASES if c.name == "corrupt_header_mid_shard")
    batches, loader = read_epoch(build(case, tmp_path / "shards"), processor, limits, 3)
    assert sorted(b["ids"][0] for b in batches[:3]) == GOOD  # good1 (just before) survives: its .json lists its image
    assert loader.skipped["tar_damage"] >= 1 and "after member good1.img0.png" in loader.last_skip


def test_truncated_tar_states_the_samples_lost_from_sizes_json(tmp_path, processor, limits):
    case = next(c for c in CASES if c.name == "truncated_tar")
    _, loader = read_epoch(build(case, tmp_path / "shards"), processor, limits, 2)
    assert "3 of 4 samples (sizes.json) read, 1 lost" in loader.last_skip


def test_twelve_images_arrive_in_index_order_or_as_listed(tmp_path, processor):
    for members, order in ((twelve_images(), range(12)), (twelve_listed(), reversed(range(12)))):
        sample = to_sample({"__key__": "many", **members})
        sizes = [Image.open(io.BytesIO(b)).size for b in sample["images"]]
        assert sizes == [(56 * (1 + i % 4), 56 * (1 + i // 4)) for i in order]
    example = processor(to_sample({"__key__": "many", **twelve_images()}) | {
        "images": [Image.open(io.BytesIO(blue_png(56 * (1 + i % 4), 56 * (1 + i // 4)))) for i in range(12)]})
    grids = example["image_grid_thw"].tolist()
    assert [(t, h, w) for t, h, w in grids] == [(1, 4 * (1 + i // 4), 4 * (1 + i % 4)) for i in range(12)]


def test_16bit_and_palette_images_keep_their_values():
    from data.media import load_image
    grey = load_image(png(Image.fromarray(np.full((8, 8), 32896, np.uint16))))
    assert np.asarray(grey)[0, 0].tolist() == [128, 128, 128]  # not clipped to white
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    assert np.asarray(load_image(png(palette)))[0, 0].tolist() == [200, 10, 10]
    palette.info["transparency"] = 1
    assert np.asarray(load_image(png(palette)))[0, 0].tolist() == [255, 255, 255]
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert np.asarray(load_image(png(transparent)))[0, 0].tolist() == [255, 255, 255]  # on white, not black


# ---- end to end: the real CLI on a crafted shard directory -------------------------------------------------------
def test_training_on_crafted_bad_shards_finishes_and_logs_the_tally(tmp_path):
    directory = tmp_path / "shards"
    directory.mkdir()
    groups = [(f"good{i}", image_sample(blue_png())) for i in range(6)]
    groups[2:2] = [("nan_audio", audio_sample(with_value(np.nan))), ("bomb", image_sample(png_declaring(90_000, 90_000))),
                   ("json_list", {"json": b"[]"}), ("truncated_png", image_sample(blue_png()[:60]))]
    write_tar(directory / "shard-000000.tar", groups)
    (directory / "sizes.json").write_text(json.dumps({"shard-000000.tar": len(groups)}))
    config = {"model": str(ROOT / "configs/models/tiny-omni.yaml"), "steps": 3, "log_every": 1, "device": "cpu",
              "output_dir": str(tmp_path / "run"), "objective": {"name": "ntp"},
              "data": {"kind": "shards", "shards": str(directory), "batch_size": 2, "shuffle_buffer": 0}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "tools.train", str(tmp_path / "train.yaml")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if r.get("event") == "skipped"]
    assert skipped and skipped[-1]["count"] >= 4
    by_reason = skipped[-1]["by_reason"]
    assert {"audio_non_finite", "image_too_large", "bad_json", "undecodable_image"} <= set(by_reason)
    assert "skipped" in result.stderr + result.stdout


# ---- held-out batches (the tier probe's data) keep their tally ----------------------------------------------------
def test_held_out_batches_count_their_skips_by_reason(tmp_path, tiny_omni):
    from models.config import from_dict
    from training.config import TrainConfig
    from training.data import held_out_batches

    (tmp_path / "good.png").write_bytes(blue_png())
    (tmp_path / "cut.png").write_bytes(blue_png()[:60])
    lines = [{"id": "g0", "image": "good.png", "caption": "Blue."},
             {"id": "cut", "image": "cut.png", "caption": "Blue."},
             {"id": "long", "caption": "word " * 2000},
             {"id": "g1", "image": "good.png", "caption": "Blue."}]
    manifest = tmp_path / "eval.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = from_dict(TrainConfig, {"model": str(ROOT / "configs/models/tiny-omni.yaml"), "output_dir": str(tmp_path),
                                     "data": {"kind": "manifest", "manifest": str(manifest),
                                              "eval_manifest": str(manifest)}}, source="test")
    batches, skips = held_out_batches(config, tiny_omni[0], max_batches=4, batch_size=2)
    assert [i for batch in batches for i in batch["ids"]] == ["g0", "g1"]
    assert dict(skips.counts) == {"undecodable_image": 1, "too_long": 1} and "long" in skips.last
