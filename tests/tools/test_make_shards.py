"""Shards from a manifest of real media, read back with stock webdataset."""
import json
import shutil

import pytest
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


def test_duplicate_and_empty_keys_are_left_out_and_named(tmp_path, assets, capsys):
    shutil.copy(assets / "coco_000000039769.png", tmp_path / "cats.png")
    rows = [{"id": "a.b", "image": "cats.png", "caption": "One."}, {"id": "a_b", "image": "cats.png", "caption": "Two."},
            {"id": "  ", "caption": "Empty key."}, {"id": "c", "images": "cats.png", "caption": "A path, not a list."}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert main([str(tmp_path / "m.jsonl"), str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "line 2: " in err and "duplicate key 'a_b' (line 1 has it" in err and "line 3: " in err and "empty `id`" in err
    keys = [s["__key__"] for s in wds.WebDataset(str(tmp_path / "out" / "shard-000000.tar"), shardshuffle=False)]
    assert keys == ["a_b", "c"]


def test_files_it_did_not_write_are_refused_and_never_deleted(tmp_path, assets, capsys):
    shutil.copy(assets / "coco_000000039769.png", tmp_path / "cats.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "a", "image": "cats.png", "caption": "Cats."}))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main([str(tmp_path / "m.jsonl"), str(out)]) == 2
    assert "did not write (notes.txt)" in capsys.readouterr().err
    assert main([str(tmp_path / "m.jsonl"), str(out), "--overwrite"]) == 0  # written next to it, notes.txt kept
    assert (out / "notes.txt").read_text() == "mine" and (out / "shard-000000.tar").is_file()
    (out / "theirs.tar").write_bytes(b"")  # someone else's shard would be read as part of this dataset
    assert main([str(tmp_path / "m.jsonl"), str(out), "--overwrite"]) == 2
    assert "1 shard(s) make_shards did not write (theirs.tar)" in capsys.readouterr().err
    assert (out / "theirs.tar").is_file()


def test_overwrite_with_only_bad_lines_keeps_the_old_shards_and_fails(tmp_path, assets, capsys):
    shutil.copy(assets / "coco_000000039769.png", tmp_path / "cats.png")
    (tmp_path / "good.jsonl").write_text(json.dumps({"id": "a", "image": "cats.png", "caption": "Cats."}))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"id": "b", "image": "missing.png", "caption": "x"}) + "\n[1]\n")
    out = tmp_path / "out"
    assert main([str(tmp_path / "good.jsonl"), str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main([str(tmp_path / "bad.jsonl"), str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "nothing written: all 2 manifest line(s)" in err and "out is unchanged" in err and "line 2:" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("option", [["--max-samples", "0"], ["--workers", "-1"], ["--max-bytes", "0"],
                                    ["--max-samples", "x"]])
def test_arguments_are_validated(tmp_path, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "m.jsonl"), str(tmp_path / "out"), *option])
    assert exit_info.value.code == 2 and option[0] in capsys.readouterr().err and not (tmp_path / "out").exists()
