"""The shard stream: rank splitting, equal batch counts, exact resume, bad samples skipped and counted."""
import io
import json

import pytest
import webdataset as wds
from PIL import Image

from data.media import load_image
from data.pipeline import ShardBatches, to_sample


def write_shards(directory, count=12, per_shard=3, extra=()):
    """img2dataset layout (`.jpg` + `.txt` + `.json`) in `count` samples; `extra`: (key, members) groups."""
    directory.mkdir()
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="JPEG")
    sizes = {}
    with wds.ShardWriter(str(directory / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        groups = [{"__key__": f"s{i:03d}", "jpg": buffer.getvalue(), "txt": f"caption {i}".encode(),
                   "json": json.dumps({"url": f"http://example/{i}.jpg"}).encode()} for i in range(count)]
        for key, members in extra:
            groups.append({"__key__": key, **members})
        for group in groups:
            sink.write(group)
            sizes[sink.fname.split("/")[-1]] = sizes.get(sink.fname.split("/")[-1], 0) + 1
    (directory / "sizes.json").write_text(json.dumps(sizes))
    return directory


def keys_only(sample):
    """A stand-in processor: the caption text identifies the sample; corrupt images still fail to decode."""
    if sample["images"]:
        load_image(sample["images"][0], sample["id"])  # raises MediaError, as the processor's decoding does
    return sample["id"]


def stream(directory, rank=0, world_size=1, batch_size=2, seed=0):
    return ShardBatches(directory, keys_only, list, batch_size, seed=seed, rank=rank, world_size=world_size)


def first_epoch(batches):
    out = []
    for batch in batches:
        if batches.epoch > 0:
            break
        out.extend(batch)
    return out


def test_img2dataset_layout_becomes_caption_samples(tmp_path):
    directory = write_shards(tmp_path / "s", count=1)
    group = next(iter(wds.WebDataset(str(directory / "shard-000000.tar"), shardshuffle=False)))
    sample = to_sample(group)
    assert sample["conversation"][1]["content"] == "caption 0" and "<image>" in sample["conversation"][0]["content"]
    assert len(sample["images"]) == 1


def test_two_ranks_see_disjoint_samples_and_equal_batch_counts(tmp_path):
    directory = write_shards(tmp_path / "s", count=12, per_shard=3)
    seen = [first_epoch(stream(directory, rank=r, world_size=2)) for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == 6 and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [f"s{i:03d}" for i in range(12)]


def test_resume_after_k_batches_equals_an_uninterrupted_epoch(tmp_path):
    directory = write_shards(tmp_path / "s", count=12, per_shard=5)
    full = first_epoch(stream(directory, batch_size=2, seed=4))
    interrupted = stream(directory, batch_size=2, seed=4)
    iterator = iter(interrupted)
    head = [key for _ in range(3) for key in next(iterator)]
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed = stream(directory, batch_size=2, seed=4)
    resumed.load_state_dict(state)
    assert head + first_epoch(resumed) == full


def test_bad_samples_are_skipped_and_counted(tmp_path):
    bad = [("corrupt", {"jpg": b"\xff\xd8 not really", "txt": b"broken"}),
           ("nojson", {"jpg": b"\xff\xd8 also bad"})]
    directory = write_shards(tmp_path / "s", count=6, per_shard=4, extra=bad)
    batches = stream(directory, batch_size=1)
    keys = first_epoch(batches)
    assert sorted(keys) == [f"s{i:03d}" for i in range(6)]
    assert sum(batches.skipped.values()) == 2


def test_truncated_shard_is_counted_and_the_rest_arrives(tmp_path):
    directory = write_shards(tmp_path / "s", count=8, per_shard=4)
    shard = directory / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:700])
    batches = stream(directory, batch_size=1)
    keys = first_epoch(batches)
    assert {f"s{i:03d}" for i in range(4)} <= set(keys)
    assert any("unreadable shard" in reason for reason in batches.skipped)


def test_changed_rank_layout_is_refused(tmp_path):
    directory = write_shards(tmp_path / "s", count=4, per_shard=2)
    state = stream(directory, rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size changed"):
        stream(directory, rank=0, world_size=1).load_state_dict(state)
