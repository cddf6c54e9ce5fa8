"""The shard stream: rank x worker splitting, equal batch counts, exact resume, bad samples skipped and counted."""
import io
import json
from itertools import islice

import pytest
import torch
import webdataset as wds
from PIL import Image

from data.loader import StreamLoader
from data.pipeline import ShardReader, ShardStream, even_split, to_sample


def write_shards(directory, count=12, per_shard=3, extra=(), sizes_json=True):
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
    if sizes_json:
        (directory / "sizes.json").write_text(json.dumps(sizes))
    return directory


def keys_only(sample):
    """A stand-in processor: the key identifies the sample (the stream decodes images before it: corrupt ones
    are skipped there)."""
    assert all(isinstance(image, Image.Image) for image in sample["images"])
    return sample["id"]


def loader(directory, rank=0, world_size=1, batch_size=2, seed=0, workers=0, shuffle_buffer=0):
    dataset = ShardStream(directory, keys_only, list, batch_size, seed=seed, rank=rank, world_size=world_size,
                          shuffle_buffer=shuffle_buffer)
    return StreamLoader(dataset, num_workers=workers)


def first_epoch(batches):
    """Every key of the rank's first epoch, in order (the epoch's batch count comes from sizes.json)."""
    return [key for batch in islice(batches, batches.stream.batches_per_epoch(0)) for key in batch]


def test_img2dataset_layout_becomes_caption_samples(tmp_path):
    directory = write_shards(tmp_path / "s", count=1)
    group = next(iter(wds.WebDataset(str(directory / "shard-000000.tar"), shardshuffle=False)))
    sample = to_sample(group)
    assert sample["conversation"][1]["content"] == "caption 0" and "<image>" in sample["conversation"][0]["content"]
    assert len(sample["images"]) == 1


def test_video2dataset_layout_becomes_a_video_caption_sample():
    sample = to_sample({"__key__": "v1", "mp4": b"video bytes", "txt": b"a dog runs", "json": b"{}"})
    assert sample["videos"] == [b"video bytes"] and "<video>" in sample["conversation"][0]["content"]
    assert sample["conversation"][1]["content"] == "a dog runs"


def test_two_ranks_see_disjoint_samples_and_equal_batch_counts(tmp_path):
    directory = write_shards(tmp_path / "s", count=12, per_shard=3)
    seen = [first_epoch(loader(directory, rank=r, world_size=2)) for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == 6 and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [f"s{i:03d}" for i in range(12)]


def test_two_ranks_by_two_workers_cover_the_epoch_exactly_once(tmp_path):
    directory = write_shards(tmp_path / "s", count=24, per_shard=3)
    seen = [first_epoch(loader(directory, rank=r, world_size=2, batch_size=1, workers=2, shuffle_buffer=2))
            for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == 12 and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [f"s{i:03d}" for i in range(24)]


def test_uneven_ranks_yield_equal_batch_counts(tmp_path):
    directory = write_shards(tmp_path / "s", count=10, per_shard=4, sizes_json=False)  # shards of 4, 4, 2
    counts = [loader(directory, rank=r, world_size=2, batch_size=1).stream.batches_per_epoch(0) for r in range(2)]
    assert counts[0] == counts[1] > 0


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_k_batches_equals_an_uninterrupted_epoch(tmp_path, workers):
    directory = write_shards(tmp_path / "s", count=20, per_shard=5)
    full = first_epoch(loader(directory, batch_size=2, seed=4, workers=workers, shuffle_buffer=3))
    interrupted = loader(directory, batch_size=2, seed=4, workers=workers, shuffle_buffer=3)
    head = [key for batch in islice(interrupted, 3) for key in batch]
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed = loader(directory, batch_size=2, seed=4, workers=workers, shuffle_buffer=3)
    resumed.load_state_dict(state)
    tail = [key for batch in islice(resumed, len(full) // 2 - 3) for key in batch]
    assert head + tail == full and sorted(full) == [f"s{i:03d}" for i in range(20)]


def test_shuffle_depends_on_seed_and_epoch(tmp_path):
    directory = write_shards(tmp_path / "s", count=12, per_shard=6)
    batches = loader(directory, batch_size=1, shuffle_buffer=4)
    two_epochs = [key for batch in islice(batches, 24) for key in batch]
    assert sorted(two_epochs[:12]) == sorted(two_epochs[12:]) and two_epochs[:12] != two_epochs[12:]
    assert first_epoch(loader(directory, batch_size=1, shuffle_buffer=4, seed=1)) != two_epochs[:12]


def test_bad_samples_are_skipped_and_counted(tmp_path):
    bad = [("corrupt", {"jpg": b"\xff\xd8 not really", "txt": b"broken"}),
           ("nojson", {"jpg": b"\xff\xd8 also bad"})]
    directory = write_shards(tmp_path / "s", count=6, per_shard=4, extra=bad)
    batches = loader(directory, batch_size=1)
    keys = [key for batch in islice(batches, 7) for key in batch]  # the epoch, then the next one's first
    assert sorted(keys[:6]) == [f"s{i:03d}" for i in range(6)]
    assert sum(batches.skipped.values()) == 2 and "nojson" in batches.last_skip


def test_truncated_shard_is_counted_and_the_rest_arrives(tmp_path):
    directory = write_shards(tmp_path / "s", count=8, per_shard=4)
    shard = directory / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:700])
    batches = loader(directory, batch_size=1)
    keys = [key for batch in islice(batches, 5) for key in batch]
    assert {f"s{i:03d}" for i in range(4)} <= set(keys)
    assert batches.skipped["tar_truncated"] % 4 == 0  # per epoch: sizes.json's 4 samples, none of them whole
    assert "shard-000001.tar" in batches.last_skip and "of 4 samples (sizes.json) read" in batches.last_skip
    print(batches.last_skip)


def test_changed_layout_is_refused(tmp_path):
    directory = write_shards(tmp_path / "s", count=8, per_shard=2)
    state = loader(directory, rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size changed"):
        loader(directory, rank=0, world_size=1).load_state_dict(state)
    with pytest.raises(ValueError, match="num_workers"):
        loader(directory, rank=0, world_size=2, workers=2).load_state_dict(state)


def test_too_few_shards_for_the_workers_is_a_clear_error(tmp_path):
    directory = write_shards(tmp_path / "s", count=4, per_shard=4)
    with pytest.raises(ValueError, match="lower data.num_workers"):
        next(iter(loader(directory, batch_size=1, workers=2)))


def test_even_split_respects_caps_and_total():
    assert even_split(7, [4, 4]) == [4, 3]
    assert even_split(5, [1, 9, 9]) == [1, 2, 2]
    with pytest.raises(ValueError):
        even_split(10, [2, 2])


def test_every_kind_of_bad_sample_is_skipped_with_the_real_processor(tmp_path, processor):
    def conversation(question, answer):
        return json.dumps({"conversation": [{"role": "user", "content": question},
                                            {"role": "assistant", "content": answer}]}).encode()

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "blue").save(buffer, format="JPEG")
    good = [(f"good{i}", {"json": conversation("<image>\nWhat colour?", "Blue."), "jpg": buffer.getvalue()})
            for i in range(3)]
    bad = [("corrupt", {"json": conversation("<image>\nWhat colour?", "Blue."), "jpg": b"\xff\xd8 broken"}),
           ("nojson", {"jpg": buffer.getvalue()}),
           ("orphan", {"json": conversation("<image>\nWhat colour?", "Blue.")}),
           ("toolong", {"json": conversation("Repeat.", "word " * (processor.max_length + 10))})]
    directory = write_shards(tmp_path / "s", count=0, per_shard=8, extra=good + bad)
    stream = ShardStream(directory, processor, processor.collate, batch_size=1)
    batches = StreamLoader(stream)
    ids = [batch["ids"][0] for batch in islice(batches, 4)]  # the epoch's 3 good samples, then epoch 2 begins
    assert sorted(ids[:3]) == ["good0", "good1", "good2"]
    assert batches.skipped == {"undecodable_image": 1, "no_text": 1, "placeholder_mismatch": 1, "too_long": 1}


def tokens_of(sample):
    """A stand-in processor giving samples of 1-6 tokens, so packed batches close at varying points."""
    length = 1 + int(sample["id"][1:]) % 6
    ids = torch.arange(length)
    return {"id": sample["id"], "input_ids": ids, "labels": ids, "modality_ids": torch.zeros_like(ids)}


@pytest.mark.parametrize("workers", [0, 2])
def test_packed_stream_resumes_exactly(tmp_path, workers):
    directory = write_shards(tmp_path / "s", count=30, per_shard=5)

    def packed():
        return StreamLoader(ShardStream(directory, tokens_of, None, batch_size=2, seed=1, shuffle_buffer=3,
                                        pack_length=8), num_workers=workers)

    full = [batch["ids"] for batch in islice(packed(), 12)]
    interrupted = packed()
    head = [batch["ids"] for batch in islice(interrupted, 5)]
    resumed = packed()
    resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
    assert head + [batch["ids"] for batch in islice(resumed, 7)] == full
    first_epoch_ids = [key for ids in full for key in ids][:30]
    assert sorted(first_epoch_ids) == [f"s{i:03d}" for i in range(30)]  # packing loses no sample


def test_a_worker_with_less_than_a_batch_in_an_epoch_moves_on(tmp_path):
    directory = write_shards(tmp_path / "s", count=13, per_shard=4)  # shards of 4, 4, 4 and 1
    batches = loader(directory, batch_size=2, workers=2, world_size=2, rank=0)
    budgets = [[batches.stream.batch_budget(epoch, s) for s in range(2)] for epoch in range(6)]
    assert [0, 2] in budgets or [2, 0] in budgets  # the 1-sample shard leaves a worker nothing in some epoch
    keys = [key for batch in islice(batches, 12) for key in batch]
    assert len(keys) == 24 and set(keys) <= {f"s{i:03d}" for i in range(13)}


def test_sample_counts_come_from_img2dataset_stats_files(tmp_path):
    directory = write_shards(tmp_path / "s", count=10, per_shard=4, sizes_json=False)  # shards of 4, 4, 2
    (directory / "shard-000000_stats.json").write_text(json.dumps({"count": 5, "successes": 4, "failed": 1}))
    (directory / "shard-000001_stats.json").write_text("{not json")
    stream = ShardStream(directory, keys_only, list, 1)
    assert stream.sizes == [4, 4, 2]
    (directory / "shard-000002_stats.json").write_text(json.dumps({"successes": 1}))  # the stats file wins
    assert ShardStream(directory, keys_only, list, 1).sizes == [4, 4, 1]


def test_the_real_processor_runs_in_spawned_workers(tmp_path, processor):
    """spawn (macOS) and forkserver (Python 3.14's Linux default) pickle the stream into each worker."""
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "blue").save(buffer, format="JPEG")
    groups = [(f"g{i}", {"jpg": buffer.getvalue(), "txt": b"A blue square."}) for i in range(4)]
    directory = write_shards(tmp_path / "s", count=0, per_shard=2, extra=groups)
    stream = ShardStream(directory, processor, processor.collate, batch_size=2)
    batch = next(iter(StreamLoader(stream, num_workers=1, start_method="spawn")))
    assert batch["pixel_values"].shape[0] > 0 and len(batch["ids"]) == 2


def test_the_shuffle_buffer_is_bounded_in_bytes(tmp_path):
    big = [(f"v{i}", {"mp4": bytes(1000), "txt": b"a clip"}) for i in range(20)]
    directory = write_shards(tmp_path / "s", count=0, per_shard=20, extra=big)
    shard = directory / "shard-000000.tar"
    unbounded, bounded = ShardReader(shard, 0, 100), ShardReader(shard, 0, 100, max_buffer_bytes=5000)
    keys = [[g["__key__"] for g in reader.groups()] for reader in (unbounded, bounded)]
    assert sorted(keys[0]) == sorted(keys[1]) == sorted(f"v{i}" for i in range(20)) and keys[0] != keys[1]
    assert unbounded.peak_buffer_bytes > 19_000 and bounded.peak_buffer_bytes <= 5000 + 1006
    resumed = [g["__key__"] for g in ShardReader(shard, 0, 100, max_buffer_bytes=5000).groups(emitted=7)]
    assert resumed == keys[1][7:]


def test_remote_shards_by_url_pattern(tmp_path):
    """`pipe:` URLs with brace patterns, as for shards in object stores (here `cat` stands in for `aws s3 cp`)."""
    directory = write_shards(tmp_path / "s", count=16, per_shard=4)
    pattern = f"pipe:cat {directory}/shard-{{000000..000003}}.tar"
    stream = ShardStream(pattern, keys_only, list, batch_size=2, world_size=1)
    assert len(stream.shards) == 4 and stream.sizes is None and stream.batches_per_epoch(0) is None
    keys = [key for batch in islice(StreamLoader(stream, num_workers=2), 8) for key in batch]
    assert sorted(keys) == [f"s{i:03d}" for i in range(16)]
    with pytest.raises(FileNotFoundError, match="shard directory not found: .*nowhere"):
        ShardStream(tmp_path / "nowhere", keys_only, list, batch_size=2)
