"""DeepSpeed through the real launcher: OrdMoE's cost under ZeRO-2, what one rank holds under ZeRO-3, start-up.

`python benchmarks/zero.py [--quick]` spawns `deepspeed --num_gpus N benchmarks/zero.py --worker ...` (2 CPU
ranks with gloo under --quick or without a GPU; else up to 2 GPUs with nccl) on tiny Ling-lite. --quick takes
about 30 s on 2 idle cores (13 s of it the launch up to the first step); 2-3 minutes on a loaded machine, and
the first launch on a machine also builds DeepSpeed's CPU comm op once. Measured:

- `ordmoe_over_ntp`: median optimizer-step time of OrdMoE (C=3, sequential) / next-token training, ZeRO-2;
- `rank_state_ratio`: bytes of parameters + gradients + optimizer state one rank holds under ZeRO-3, model
  built under zero.Init (the distinct storages of its parameter partitions `ds_tensor`, the optimizer's fp32
  master partitions, its gradient partition buffer and the Adam moments of its partitions) / what one process
  holds with the plain engine and the same training config (fp32 parameters, their gradients, Adam moments),
  in bf16 (DeepSpeed's bf16 parameters; the plain engine autocasts). `rank_state_ratio_fp32`: the same in fp32,
  where ZeRO-3 still keeps a separate fp32 master copy (4 + 4 + 4 + 8 bytes per parameter over 2 ranks: 0.625);
- `launch_s`: from starting the launcher to the end of the first optimizer step on rank 0.

Also, counted on the meta device (no weights needed): Ming-Lite-Omni's shapes (tests/models/releases.py, full
size) under `deepspeed.zero.Init` in bf16 at 8/16/64 ranks, and the host working set of the shard-by-shard
loader of training/zero_init.py (one rank's slice of the largest tensor it reads).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import REPO, summary_line

MODEL = "configs/models/tiny-ling-lite.yaml"  # every parameter trains (tiny-ling-mini's MTP layer gets no gradient)
SIZES = {"quick": ({}, 4, 64), "full": ({"hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
                                         "num_attention_heads": 8, "num_experts": 32}, 8, 256)}  # overrides, batch, seq
WARMUP, REPEATS = 2, 5


# ---- the worker: one process per rank --------------------------------------------------------------------
def train_config(stage: int, objective: str, device: str, size: str, precision: str = "auto"):
    from models.build import load_model_config
    from models.config import from_dict
    from training.config import TrainConfig
    config = from_dict(TrainConfig, {
        "model": str(REPO / MODEL), "engine": "deepspeed",
        "deepspeed": str(REPO / f"configs/deepspeed/zero{stage}.json"),
        "device": device, "precision": precision, "data": {"batch_size": SIZES[size][1]}, "optim": {"lr": 1e-3},
        "objective": {"name": objective, "tiers": {"num_tiers": 3 if objective == "ordmoe" else 1},
                      "execution": "sequential"}}, source="benchmarks/zero.py")
    model = load_model_config(config.model)
    model.backbone.config.update(SIZES[size][0])
    return config, model


def batch(step: int, rank: int, size: str, vocab: int) -> dict:
    _, micro, seq = SIZES[size]
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(3, vocab, (micro, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def timed_steps(engine, objective, rank: int, size: str, vocab: int, steps: int) -> list[float]:
    """What training/loop.py does per optimizer step (one micro-batch), each step's wall time."""
    times = []
    for step in range(1, steps + 1):
        start = time.perf_counter()
        with engine.accumulate():
            objective(engine.model, engine.prepare_batch(batch(step, rank, size, vocab)), backward=engine, step=step)
        engine.step()
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one flat buffer count once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.numel():
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def zero3_rank_bytes(engine) -> int:
    optimizer = engine.ds.optimizer
    adam = [t for flat in optimizer.fp32_partitioned_groups_flat for t in optimizer.optimizer.state[flat].values()]
    return storage_bytes([p.ds_tensor for p in engine.model.parameters()] + list(optimizer.fp32_partitioned_groups_flat)
                         + [optimizer.grad_partitions_flat_buffer] + adam)


def plain_bytes(config, model_config, size: str, vocab: int) -> int:
    """One process, the plain engine: parameters, their gradients at step time, Adam's moments after a step."""
    from models.build import build_model
    from models.config import from_dict, to_dict
    from training.config import TrainConfig
    from training.engine import PlainEngine
    from training.objectives import build_objective
    plain_config = from_dict(TrainConfig, {**to_dict(config), "engine": "plain", "deepspeed": None}, source="plain")
    engine = PlainEngine(build_model(model_config), plain_config, torch.device("cpu"))
    timed_steps(engine, build_objective(plain_config.objective, engine.model), 0, size, vocab, 1)
    params = [p for p in engine.model.parameters() if p.requires_grad]
    moments = [t for state in engine.optimizer.state.values() for t in state.values()]
    return storage_bytes(params + moments) + sum(p.numel() * p.element_size() for p in params)


def worker(args: argparse.Namespace) -> None:
    from training.engine import DeepSpeedEngine, _wants_bf16, deepspeed_config, init_process_group, launch_world
    from training.objectives import build_objective
    from training.zero_init import build_for_engine

    rank, local_rank, world = launch_world()
    device = torch.device("cuda", local_rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_process_group(device)
    results: dict = {"world_size": world}

    config, model_config = train_config(2, "ntp", args.device, args.size)
    vocab = model_config.backbone.config["vocab_size"]
    engine = DeepSpeedEngine(build_for_engine(model_config, None), config, device, rank, world)
    results["precision"] = str(engine.dtype).removeprefix("torch.")
    for name in ("ntp", "ordmoe"):  # ntp first: OrdMoE's tier routing hooks stay on the model
        objective = build_objective(train_config(2, name, args.device, args.size)[0].objective, engine.model)
        times = timed_steps(engine, objective, rank, args.size, vocab, 1)
        results.setdefault("first_step_at", time.time())
        times += timed_steps(engine, objective, rank, args.size, vocab, WARMUP + REPEATS - 1)
        results[f"zero2_{name}_s"] = statistics.median(times[WARMUP:])
    del engine

    for precision in ("bf16", "fp32"):  # bf16: what DeepSpeed trains in on GPUs; the plain engine autocasts
        config, model_config = train_config(3, "ordmoe", args.device, args.size, precision)
        ds = deepspeed_config(config.deepspeed, config, world, _wants_bf16(config, device))
        engine = DeepSpeedEngine(build_for_engine(model_config, ds), config, device, rank, world)  # under zero.Init
        timed_steps(engine, build_objective(config.objective, engine.model), rank, args.size, vocab, 1)
        results[f"zero3_rank_bytes_{precision}"] = zero3_rank_bytes(engine)
        if rank == 0:
            results[f"plain_bytes_{precision}"] = plain_bytes(config, model_config, args.size, vocab)
        del engine
    if rank == 0:
        Path(args.out).write_text(json.dumps(results, indent=1))
    torch.distributed.barrier()


# ---- Ming-Lite-Omni shapes, on the meta device --------------------------------------------------------------
def ming_lite_omni_counts(worlds: tuple[int, ...] = (8, 16, 64)) -> dict[str, float]:
    """Ming-Lite-Omni (v1, configs/models/ming-lite-omni.yaml) from its full-size config.json alone: the full
    model's bf16 bytes; per rank under zero.Init in bf16 (each parameter's padded 1/N partition); and the
    largest host working set of the shard-by-shard loader on any rank (the whole rows holding its slice of one
    tensor, read in bf16)."""
    import warnings

    import models  # noqa: F401
    from models.build import build_model, load_model_config
    from models.ming_checkpoint import ming_placements
    from tests.models.releases import ming_config, release_keys, write_release

    with tempfile.TemporaryDirectory() as directory:
        release = write_release(directory, ming_config("1", tiny=False), weights=False)  # config.json, tokenizer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # v1's SANM encoder is not built (a warning says so)
            config = load_model_config(release)
            with torch.device("meta"):
                model = build_model(config)
        stored = release_keys(json.loads((release / "config.json").read_text()))
        placements = ming_placements(model, stored, release, config.checkpoint_components)
    bf16 = 2
    numels = {name: t.numel() for name, t in model.state_dict().items()}
    total = sum(p.numel() for p in model.parameters())
    out: dict[str, float] = {"ming_params_b": total / 1e9, "ming_full_gb": total * bf16 / 1e9,
                             "ming_largest_tensor_mb": max(numels.values()) * bf16 / 1e6,
                             # zero.Init allocates one module's parameters whole, then partitions them
                             "ming_largest_module_mb": max(sum(p.numel() for p in m.parameters(recurse=False))
                                                           for m in model.modules()) * bf16 / 1e6}
    for world in worlds:
        out[f"ming_rank_gb_w{world}"] = sum(math.ceil(p.numel() / world) * bf16 for p in model.parameters()) / 1e9
        peak = 0
        for key, place in placements.items():
            shape, size = stored[key], math.ceil(numels[place.target] / world)
            row = math.prod(shape[1:]) if len(shape) > 1 else 1
            for rank in range(place.offset // size, (place.offset + place.numel - 1) // size + 1):  # overlapping
                begin = max(place.offset, rank * size) - place.offset
                end = min(place.offset + place.numel, (rank + 1) * size, numels[place.target]) - place.offset
                if begin < end:
                    peak = max(peak, (math.ceil(end / row) - begin // row) * row * bf16)
        out[f"ming_loader_peak_mb_w{world}"] = peak / 1e6
    return out


# ---- the launcher side ---------------------------------------------------------------------------------------
def launch(device: str, size: str, ranks: int) -> tuple[dict, float]:
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # DeepSpeed's CPU accelerator
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        cmd = [launcher, "--num_gpus", str(ranks), "--master_port", str(29500 + (os.getpid() + 250) % 1000),
               __file__, "--worker", "--out", str(out), "--device", device, "--size", size]
        started = time.time()
        run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
        if run.returncode != 0:
            sys.exit(f"benchmarks/zero.py: the launch failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        return json.loads(out.read_text()), started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 CPU ranks (gloo), the tiny model: about 30 s")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a rank the launcher started
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="quick", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the launcher passes it
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    gpu = torch.cuda.is_available() and not args.quick
    device, size = ("cuda", "full") if gpu else ("cpu", "quick")
    ranks = min(2, torch.cuda.device_count()) if gpu else 2
    results, started = launch(device, size, ranks)
    ratio = results["zero2_ordmoe_s"] / results["zero2_ntp_s"]
    state = {p: results[f"zero3_rank_bytes_{p}"] / results[f"plain_bytes_{p}"] for p in ("bf16", "fp32")}
    print(f"{results['world_size']} ranks on {device}, {results['precision']}: ZeRO-2 step ntp "
          f"{results['zero2_ntp_s'] * 1e3:.1f} ms, ordmoe {results['zero2_ordmoe_s'] * 1e3:.1f} ms")
    for p in state:  # ZeRO-3 in fp32 still keeps a separate fp32 master copy: 4 + 4 + 4 + 8 bytes per parameter
        print(f"ZeRO-3 {p}: one rank holds {results[f'zero3_rank_bytes_{p}'] / 2**20:.2f} MiB, one process "
              f"{results[f'plain_bytes_{p}'] / 2**20:.2f} MiB")
    ming = ming_lite_omni_counts()
    print("Ming-Lite-Omni shapes (meta device): " + ", ".join(f"{k}={v:.3f}" for k, v in ming.items()))
    print(summary_line("zero", ordmoe_over_ntp=ratio, rank_state_ratio=state["bf16"],
                       launch_s=results["first_step_at"] - started, ranks=results["world_size"],
                       rank_state_ratio_fp32=state["fp32"],
                       ming_rank_gb_w8=ming["ming_rank_gb_w8"], ming_loader_peak_mb_w8=ming["ming_loader_peak_mb_w8"]))


if __name__ == "__main__":
    main()
