"""Training data under real torch.distributed: two gloo processes split the demo shards between them."""
import json
from itertools import islice

import torch.distributed as dist
import torch.multiprocessing as mp

from data.demo_data import build_demo_data


def read_first_epoch(rank: int, world_size: int, shards: str, out: str) -> None:
    import models  # noqa: F401
    from models.build import build_model
    from models.config import from_dict
    from training.config import TrainConfig
    from training.data import train_stream

    dist.init_process_group("gloo", init_method=f"file://{out}.rendezvous", rank=rank, world_size=world_size)
    config = from_dict(TrainConfig, {"model": "configs/models/tiny-omni.yaml",
                                     "data": {"kind": "shards", "shards": shards, "batch_size": 1}}, source="test")
    model = build_model(config.model)
    batches = train_stream(config, model, journal=False)
    ids = [i for batch in islice(batches, batches.stream.batches_per_epoch(0)) for i in batch["ids"]]
    with open(f"{out}.{rank}", "w") as file:
        json.dump({"rank": batches.stream.rank, "world_size": batches.stream.world_size, "ids": ids}, file)
    dist.destroy_process_group()


def test_ranks_of_a_real_process_group_read_disjoint_equal_shares(tmp_path):
    paths = build_demo_data(tmp_path / "demo", samples_per_kind=6)  # 2 shards of at most 16
    out = str(tmp_path / "ids")
    mp.spawn(read_first_epoch, args=(2, str(paths["train_shards"]), out), nprocs=2)
    seen = [json.loads(open(f"{out}.{rank}").read()) for rank in range(2)]
    assert [s["rank"] for s in seen] == [0, 1] and all(s["world_size"] == 2 for s in seen)
    assert len(seen[0]["ids"]) == len(seen[1]["ids"]) > 0 and not set(seen[0]["ids"]) & set(seen[1]["ids"])
