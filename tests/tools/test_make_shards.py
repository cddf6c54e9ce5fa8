"""Shards from a manifest of real media, read back with stock webdataset."""
import json
import shutil

import webdataset as wds

from data.media import load_audio, load_image
from tools.make_shards import main


def test_shards_are_readable_by_stock_webdataset_and_bad_media_are_left_out(tmp_path, assets, capsys):
    for name in ("coco_000000039769.png", "LDC93S1.wav", "mmaction2_demo_arm_wrestling.mp4"):
        shutil.copy(assets / name, tmp_path / name)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    rows = [{"id": "cats", "image": "coco_000000039769.png", "caption": "Two cats."},
            {"id": "speech", "audio": "LDC93S1.wav",
             "conversation": [{"role": "user", "content": "<audio>"}, {"role": "assistant", "content": "She had"}]},
            {"id": "video", "video": "mmaction2_demo_arm_wrestling.mp4", "caption": "Arm wrestling."},
            {"id": "broken", "image": "broken.jpg", "caption": "never written"},
            {"id": "text", "conversation": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "shards"
    assert main([str(tmp_path / "m.jsonl"), str(out), "--max-samples", "2"]) == 0
    assert "line 4" in capsys.readouterr().err
    assert main([str(tmp_path / "m.jsonl"), str(tmp_path / "strict"), "--strict"]) == 1

    sizes = json.loads((out / "sizes.json").read_text())
    assert sorted(sizes) == ["shard-000000.tar", "shard-000001.tar"] and sum(sizes.values()) == 4
    stats = json.loads((out / "stats.json").read_text())
    assert stats["modalities"] == {"images": 1, "audios": 1, "videos": 1, "text": 1} and len(stats["skipped"]) == 1

    samples = list(wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False))
    by_key = {s["__key__"]: s for s in samples}
    assert sorted(by_key) == ["cats", "speech", "text", "video"]
    assert load_image(by_key["cats"]["img0.png"]).size == (640, 480)
    assert load_audio(by_key["speech"]["aud0.wav"]).ndim == 1
    assert json.loads(by_key["cats"]["json"])["images"] == ["img0.png"]
    assert by_key["video"]["vid0.mp4"] == (assets / "mmaction2_demo_arm_wrestling.mp4").read_bytes()


def test_parallel_validation_writes_the_same_shards_and_existing_shards_are_kept(tmp_path, assets, capsys):
    for name in ("coco_000000039769.png", "LDC93S1.wav"):
        shutil.copy(assets / name, tmp_path / name)
    rows = [{"id": f"s{i}", "image": "coco_000000039769.png", "caption": f"Cats {i}."} for i in range(5)]
    rows += [{"id": "speech", "audio": "LDC93S1.wav", "caption": "She had."}, {"id": "gone", "image": "missing.png",
                                                                               "caption": "x"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))

    def read(directory):
        return [(s["__key__"], sorted(s)) for s in
                wds.WebDataset(sorted(str(p) for p in directory.glob("*.tar")), shardshuffle=False)]

    assert main([str(tmp_path / "m.jsonl"), str(tmp_path / "serial"), "--max-samples", "2"]) == 0
    assert main([str(tmp_path / "m.jsonl"), str(tmp_path / "parallel"), "--max-samples", "2", "--workers", "2"]) == 0
    assert read(tmp_path / "serial") == read(tmp_path / "parallel") and len(read(tmp_path / "serial")) == 6
    assert (tmp_path / "serial" / "sizes.json").read_text() == (tmp_path / "parallel" / "sizes.json").read_text()

    capsys.readouterr()
    assert main([str(tmp_path / "m.jsonl"), str(tmp_path / "serial")]) == 2
    assert "already holds 3 shard(s)" in capsys.readouterr().err
    assert main([str(tmp_path / "m.jsonl"), str(tmp_path / "serial"), "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "serial").glob("*.tar")) == ["shard-000000.tar"]
