import json
import time
from itertools import islice

from data.demo_data import build_demo_data
from data.media import load_audio, load_image, load_video
from data.loader import StreamLoader
from data.pipeline import ShardStream


def test_demo_data_builds_fast_and_every_file_decodes(tmp_path):
    started = time.perf_counter()
    paths = build_demo_data(tmp_path, samples_per_kind=3)
    assert time.perf_counter() - started < 60
    rows = [json.loads(line) for line in paths["eval"].read_text().splitlines()]
    rows += [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert len(rows) == 4 * 3 + 3 + 4 and all(r["answer"] for r in rows)
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
