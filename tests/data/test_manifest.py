"""JSONL manifests: parsing errors name the line; the stream splits by rank x worker and resumes exactly."""
import json
import time
from itertools import islice

import pytest
import torch

from data.loader import DataTimeoutError, StreamLoader
from data.manifest import ManifestError, ManifestStream, read_manifest
from data.processor import ProcessorError


def samples(count):
    return [{"id": f"m{i:02d}"} for i in range(count)]


def process(sample):
    if sample["id"].startswith("bad"):
        raise ProcessorError(f"sample {sample['id']}: the conversation has 1 <image> marker(s) but 0 image(s)",
                             "placeholder_mismatch")
    return sample["id"]


def loader(items, workers=0, rank=0, world_size=1, batch_size=2, **kwargs):
    stream = ManifestStream(items, process, list, batch_size, seed=2, rank=rank, world_size=world_size, **kwargs)
    return StreamLoader(stream, num_workers=workers)


def test_read_manifest_names_the_bad_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a", "caption": "x", "image": "a.png"}\n\n{"id": "b"}\n')
    with pytest.raises(ManifestError, match=r"m.jsonl:3: needs `conversation` or `caption`"):
        read_manifest(path)
    path.write_text('{"id": "a", "caption": "x", "image": "a.png"}\nnot json\n')
    with pytest.raises(ManifestError, match=r"m.jsonl:2: not JSON"):
        read_manifest(path)


def test_two_ranks_by_two_workers_read_disjoint_equal_shares():
    seen = [[k for b in islice(loader(samples(18), workers=2, rank=r, world_size=2), 4) for k in b] for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == 8 and not set(seen[0]) & set(seen[1])


def test_resume_with_workers_continues_exactly():
    full = [k for b in islice(loader(samples(16), workers=2), 8) for k in b]
    first = loader(samples(16), workers=2)
    head = [k for b in islice(first, 3) for k in b]
    resumed = loader(samples(16), workers=2)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert head + [k for b in islice(resumed, 5) for k in b] == full
    assert sorted(full[:16]) == [f"m{i:02d}" for i in range(16)]


def test_bad_samples_are_skipped_counted_and_named():
    items = samples(4) + [{"id": "bad-marker"}]
    batches = loader(items, batch_size=1, shuffle=False)
    assert [b[0] for b in islice(batches, 5)] == ["m00", "m01", "m02", "m03", "m00"]
    assert batches.skipped == {"placeholder_mismatch": 1} and "bad-marker" in batches.last_skip


def test_one_epoch_keeps_the_partial_last_batch():
    stream = ManifestStream(samples(5), process, list, 2, shuffle=False, drop_last=False)
    assert [batch for batch, _ in stream.one_epoch()] == [["m00", "m01"], ["m02", "m03"], ["m04"]]


def test_packed_manifest_resumes_exactly():
    def tokens(sample):
        ids = torch.arange(1 + int(sample["id"][1:]) % 5)
        return {"id": sample["id"], "input_ids": ids, "labels": ids, "modality_ids": torch.zeros_like(ids)}

    def packed():
        return StreamLoader(ManifestStream(samples(20), tokens, None, 2, seed=3, pack_length=6), num_workers=2)

    full = [b["ids"] for b in islice(packed(), 10)]
    first = packed()
    head = [b["ids"] for b in islice(first, 4)]
    resumed = packed()
    resumed.load_state_dict(first.state_dict())
    assert head + [b["ids"] for b in islice(resumed, 6)] == full


def hangs_on_m03(sample):
    if sample["id"] == "m03":
        time.sleep(3)  # a decoder that hangs (for longer than the timeout)
    return sample["id"]


def test_a_hung_worker_fails_with_an_actionable_error():
    stream = ManifestStream(samples(8), hangs_on_m03, list, 1, shuffle=False)
    batches = StreamLoader(stream, num_workers=1, timeout_s=1)
    with pytest.raises(DataTimeoutError, match=r"data.timeout_s=1 s: DataLoader worker 0 \(data stream 0\).*resumable"):
        list(islice(batches, 8))
    assert batches.positions[0]["index"] == 3  # the last good batch, from which a resume would start
