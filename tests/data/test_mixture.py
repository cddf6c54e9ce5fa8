"""Resampled weighted mixtures: proportions follow the weights, restarts continue the same draws."""
import json
from collections import Counter
from itertools import islice

import pytest
import webdataset as wds

from data.loader import StreamLoader
from data.mixture import MixtureSource, MixtureStream


def text_shards(directory, prefix, count, per_shard=4):
    directory.mkdir()
    with wds.ShardWriter(str(directory / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(count):
            sink.write({"__key__": f"{prefix}{i:03d}", "txt": f"{prefix} caption {i}".encode()})
    return str(directory)


def key(sample):
    return sample["id"]


@pytest.fixture
def sources(tmp_path):
    return [MixtureSource("image_text", text_shards(tmp_path / "a", "a", 12), 5.0),
            MixtureSource("text", text_shards(tmp_path / "b", "b", 8), 3.0),
            MixtureSource("audio", text_shards(tmp_path / "c", "c", 8), 2.0)]


def mixture(sources, workers=0, rank=0, seed=0, batch_size=4):
    return StreamLoader(MixtureStream(sources, key, list, batch_size, seed=seed, rank=rank, world_size=2,
                                      shuffle_buffer=3), num_workers=workers)


def test_samples_follow_the_mixture_weights(sources):
    batches = mixture(sources, batch_size=10)
    keys = [k for batch in islice(batches, 300) for k in batch]
    shares = Counter(k[0] for k in keys)
    assert abs(shares["a"] / 3000 - 0.5) < 0.03 and abs(shares["b"] / 3000 - 0.3) < 0.03
    assert abs(shares["c"] / 3000 - 0.2) < 0.03
    assert batches.epoch == 3000 // 28  # nominal epochs: samples drawn / samples in all datasets
    assert batches.mixture_shares() == {"audio": shares["c"] / 3000, "image_text": shares["a"] / 3000,
                                        "text": shares["b"] / 3000}


def test_ranks_draw_different_streams(sources):
    first = [list(islice(mixture(sources, rank=r), 5)) for r in range(2)]
    assert first[0] != first[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_restart_continues_the_same_draws(sources, workers):
    full = list(islice(mixture(sources, workers=workers, seed=3), 17))
    interrupted = mixture(sources, workers=workers, seed=3)
    head = list(islice(interrupted, 7))
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed = mixture(sources, workers=workers, seed=3)
    resumed.load_state_dict(state)
    assert head + list(islice(resumed, 10)) == full


def test_changed_weights_are_refused(sources):
    state = mixture(sources).state_dict()
    sources[0].weight = 1.0
    with pytest.raises(ValueError, match="datasets changed"):
        mixture(sources).load_state_dict(state)


def test_a_dataset_of_broken_shards_fails_loudly(sources, tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "shard-000000.tar").write_bytes(b"not a tar at all" * 10)
    sources.append(MixtureSource("video", str(tmp_path / "broken"), 100.0))
    with pytest.raises(ValueError, match="mixture dataset 'video': no readable sample"):
        list(islice(mixture(sources), 3))
