import json
import os
import shutil
import sys
import time
from itertools import islice

import pytest

from data.demo_data import SENTENCES, build_demo_data
from data.loader import StreamLoader
from data.media import load_audio, load_image, load_video
from data.pipeline import ShardStream


def test_demo_data_builds_fast_and_every_file_decodes(tmp_path):
    started = time.perf_counter()
    paths = build_demo_data(tmp_path, samples_per_kind=3)
    assert time.perf_counter() - started < 60
    rows = [json.loads(line) for line in paths["eval"].read_text().splitlines()]
    rows += [json.loads(line) for line in paths["train"].read_text().splitlines()]
    kinds = 5 if shutil.which("espeak-ng") else 4  # shapes, ocr, beeps, motion (+ tts)
    assert len(rows) == kinds * 3 + 3 + 4 and all(r["answer"] for r in rows)
    for row in rows:
        if "image" in row:
            assert load_image(tmp_path / row["image"]).size[0] == 224
        if "audio" in row:
            assert load_audio(tmp_path / row["audio"]).ndim == 1
        if "video" in row:
            assert load_video(tmp_path / row["video"], 8).frames.shape[0] == 8
    stats = json.loads((paths["train_shards"] / "stats.json").read_text())
    assert stats["skipped"] == [] and stats["written"] == len(rows) - len(paths["eval"].read_text().splitlines())
    shards = ShardStream(paths["train_shards"], lambda s: s["id"], list, batch_size=1)
    seen = [key for batch in islice(StreamLoader(shards), shards.batches_per_epoch(0)) for key in batch]
    assert sorted(seen) == sorted(json.loads(line)["id"] for line in paths["train"].read_text().splitlines())


def test_espeak_ng_speech_is_added_when_installed(tmp_path, monkeypatch):
    """A stand-in `espeak-ng` on PATH (same command line, writes a 22.05 kHz WAV as the real one does)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "espeak-ng"
    fake.write_text(f"#!{sys.executable}\n"
                    "import sys, numpy, soundfile\n"
                    "args = sys.argv[1:]\n"
                    "soundfile.write(args[args.index('-w') + 1], numpy.zeros(22050, 'float32'), 22050)\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    paths = build_demo_data(tmp_path / "demo", samples_per_kind=2)
    rows = [json.loads(line) for split in ("train", "eval") for line in paths[split].read_text().splitlines()]
    spoken = [r for r in rows if r["id"].startswith("tts-")]
    assert len(spoken) == 2 and all(r["answer"] in SENTENCES for r in spoken)
    assert load_audio(tmp_path / "demo" / spoken[0]["audio"]).shape == (16000,)  # resampled to 16 kHz


def test_rebuilds_its_own_output_and_never_deletes_other_files(tmp_path, capsys):
    from tools.make_demo_data import main
    out = tmp_path / "demo"
    assert main([str(out), "--per-kind", "2"]) == 0
    media_before = sorted(p.name for p in (out / "media").iterdir())
    assert main([str(out), "--per-kind", "1"]) == 0  # its own directory: rebuilt, the larger build's media removed
    media_after = sorted(p.name for p in (out / "media").iterdir())
    assert set(media_after) < set(media_before) and "shapes_001.png" not in media_after
    (out / "media" / "mine.png").write_bytes(b"user file")
    assert main([str(out), "--per-kind", "1"]) == 2
    assert "did not write (media/mine.png)" in capsys.readouterr().err
    assert main([str(out), "--per-kind", "1", "--overwrite"]) == 0
    assert (out / "media" / "mine.png").read_bytes() == b"user file"
    (out / "train_shards" / "theirs.tar").write_bytes(b"")
    assert main([str(out), "--per-kind", "1", "--overwrite"]) == 2 and (out / "train_shards" / "theirs.tar").is_file()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "other"), "--per-kind", "0"])
