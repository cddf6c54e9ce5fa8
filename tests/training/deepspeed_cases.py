"""Launched by tests/training/test_deepspeed.py with the real launcher (`deepspeed --num_gpus 2 ...`).

One launch runs several cases (ZeRO stage x objective x execution) so the start-up is paid once. For each
case, on every rank:
- `grads`: one optimizer step's gradients (2 micro-batches per rank, several backward passes each)
  against the all-paths reference (one backward of the summed loss of all C paths over the global batch);
- `params`: the parameters after `steps` AdamW steps, as the main rank sees them (gathered under ZeRO-3),
  against a single-process PlainEngine run over the same global batches, and a checksum per rank to show
  every rank holds the same weights;
- `nan`: a NaN injected into one rank's loss at step 2 skips that step on every rank.
Results go to `--out` (rank 0) as JSON; the test asserts on them.

`--export DIR` instead trains `--model` under ZeRO-3 for `steps` steps, writes the final checkpoint through
the loop's own `save` (the atomic writer, gathered weights, model files) into the run directory DIR, and
writes the logits the training model (partitioned, gathered per module by ZeRO-3) gives on a fixed batch
to DIR/training_logits.pt, for a fresh process to compare with `load_trained(DIR)`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import models  # noqa: E402,F401
from models.build import build_model  # noqa: E402
from models.config import from_dict, to_dict  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.engine import PlainEngine, build_engine, launch_world  # noqa: E402
from training.objectives import ObjectiveConfig, build_objective  # noqa: E402

MODEL = "tiny-ling-lite"  # Ming-style softmax routers; tiny-ling-mini has sigmoid routers with an expert bias
MICRO, ACCUM, SEQ = 2, 2, 12


def config_for(stage: int, name: str, execution: str, steps: int, model: str = MODEL) -> TrainConfig:
    data = {"model": f"configs/models/{model}.yaml", "steps": steps, "grad_accum": ACCUM, "seed": 0, "precision": "fp32", "device": "cpu",
            "data": {"batch_size": MICRO}, "optim": {"lr": 1e-2, "warmup_steps": 1, "grad_clip": 0.5},
            "objective": {"name": name, "tiers": {"num_tiers": 3 if name == "ordmoe" else 1},
                          "execution": execution, "bias_update_rate": 1e-3}}
    data.update(engine="deepspeed", deepspeed=f"configs/deepspeed/zero{stage}.json")
    return from_dict(TrainConfig, data, source="deepspeed_cases")


DEMO: list[dict] = []  # with --demo-data: processed demo samples (images, audio, video, text) to batch from


def load_demo(directory: Path, cfg: TrainConfig) -> None:
    """The demo dataset's samples decoded and processed as training does, in file order (same on every rank)."""
    from data.manifest import read_manifest
    from data.media import decode_media
    from training.data import processor_for, stream_limits

    processor = processor_for(fresh_model(cfg), cfg)
    limits = stream_limits(cfg, processor)
    DEMO[:] = [processor(decode_media(sample, limits, str(directory))) for sample in
               read_manifest(directory / "train.jsonl")]
    DEMO.append(processor)  # the last entry collates


def global_batches(step: int, world: int) -> list[dict]:
    """The micro-batches of one optimizer step over all ranks: rank r gets [r * ACCUM, (r + 1) * ACCUM).
    Random token ids, or with --demo-data a seeded draw of demo samples, so ranks see different modalities."""
    g = torch.Generator().manual_seed(1000 + step)
    if DEMO:
        *examples, processor = DEMO
        order = torch.randperm(len(examples), generator=g).tolist()
        return [processor.collate([examples[i] for i in order[k * MICRO:(k + 1) * MICRO]])
                for k in range(world * ACCUM)]
    out = []
    for _ in range(world * ACCUM):
        ids = torch.randint(3, 500, (MICRO, SEQ), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100
        mask = torch.ones_like(ids)
        mask[-1, -2:] = 0
        labels[-1, -2:] = -100
        out.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return out


def fresh_model(cfg: TrainConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(cfg.model)


def my_batches(step: int, rank: int, world: int) -> list[dict]:
    return global_batches(step, world)[rank * ACCUM:(rank + 1) * ACCUM]


def one_step(engine, objective, batches: list[dict], step: int, poisoned: tuple[int, ...] = ()) -> float | None:
    """What training/loop.py does for one optimizer step; the micro-batches `poisoned` get NaN embeddings."""
    finite = True
    with engine.accumulate():
        for index, batch in enumerate(batches):
            hook = (engine.model.get_input_embeddings().register_forward_hook(lambda m, i, out: out * float("nan"))
                    if index in poisoned else None)
            result = objective(engine.model, engine.prepare_batch(batch), backward=engine, step=step)
            if hook is not None:
                hook.remove()
            finite &= result.loss == result.loss
    norm = engine.step(finite=finite)
    objective.after_optimizer_step(engine, applied=norm is not None)
    return norm


def full_params(engine) -> dict[str, torch.Tensor]:
    """Every weight (gathered under ZeRO-3) on the main rank; None elsewhere under ZeRO-3."""
    state = engine.full_state_dict()
    if state is None and getattr(engine, "stage", 2) != 3:
        state = {k: v.detach().clone() for k, v in engine.model.state_dict().items()}
    return state


def update_errors(got: dict, expected: dict, initial: dict) -> dict[str, float]:
    """Per tensor: |got - expected| / |expected - initial|, the error relative to what training changed."""
    return {k: float((got[k].float() - v).norm() / (v - initial[k]).norm().clamp(min=1e-30))
            for k, v in expected.items() if k in got and v.is_floating_point() and not torch.equal(v, initial[k])}


def checksum(tensors) -> float:
    return float(sum(v.double().sum() * (i + 1) for i, v in enumerate(tensors)))


def rank_checksums(engine) -> list[float]:
    """A checksum of the full weights as each rank sees them (ZeRO-3: gathered from the partitions)."""
    import deepspeed

    gather = list(engine.model.parameters()) if engine.stage == 3 else []
    with deepspeed.zero.GatheredParameters(gather, modifier_rank=None):
        mine = torch.tensor([checksum(v for _, v in sorted(engine.model.state_dict().items()))], dtype=torch.float64)
    gathered = [torch.zeros_like(mine) for _ in range(engine.world_size)]
    torch.distributed.all_gather(gathered, mine)
    return [float(x) for x in gathered]


def gradient_case(cfg: TrainConfig, rank: int, world: int) -> dict:
    """One step's gradients (several backward passes per micro-batch) against the all-paths reference."""
    import deepspeed

    engine = build_engine(fresh_model(cfg), cfg)
    objective = build_objective(cfg.objective, engine.model)
    with engine.accumulate():
        for batch in my_batches(1, rank, world):
            objective(engine.model, engine.prepare_batch(batch), backward=engine, step=1)
    engine.ds.optimizer.finalize_gradient_accumulation_boundary()
    got = {n: deepspeed.utils.safe_get_full_grad(p) for n, p in engine.model.named_parameters() if p.requires_grad}
    reference_model = fresh_model(cfg)
    reference = build_objective(ObjectiveConfig(**{**vars(cfg.objective), "execution": "naive"}), reference_model)
    for batch in global_batches(1, world):  # all paths of a micro-batch in one backward, mean over micro-batches
        reference(reference_model, batch, backward=lambda term: (term / (world * ACCUM)).backward(), step=1)
    errors, missing = {}, []
    for name, param in reference_model.named_parameters():
        if param.grad is None:
            continue
        if got.get(name) is None:
            missing.append(name)
            continue
        errors[name] = float((got[name].float() - param.grad).norm() / param.grad.norm().clamp(min=1e-30))
    return {"grad_errors": errors, "grad_missing": missing}


def training_case(cfg: TrainConfig, steps: int, rank: int, world: int) -> dict:
    """`steps` steps: the same weights on every rank, and the weights of one process over the same global batch."""
    engine = build_engine(fresh_model(cfg), cfg)
    objective = build_objective(cfg.objective, engine.model)
    norms = [one_step(engine, objective, my_batches(step, rank, world), step) for step in range(1, steps + 1)]
    result = {"norms": norms, "rank_checksums": rank_checksums(engine)}
    state = full_params(engine)
    if rank == 0:
        plain_cfg = from_dict(TrainConfig, {**to_dict(cfg), "engine": "plain", "deepspeed": None,
                                            "grad_accum": ACCUM * world}, source="plain")
        plain = PlainEngine(fresh_model(plain_cfg), plain_cfg, torch.device("cpu"))
        plain_objective = build_objective(plain_cfg.objective, plain.model)
        result["plain_norms"] = [one_step(plain, plain_objective, global_batches(step, world), step)
                                 for step in range(1, steps + 1)]
        result["param_errors"] = update_errors(state, plain.model.state_dict(), fresh_model(cfg).state_dict())
        result["missing_params"] = sorted(set(plain.model.state_dict()) - set(state))
    return result


def nan_case(cfg: TrainConfig, rank: int, world: int) -> dict:
    """Step 2 has NaN activations on rank 1 only: every rank skips it (no update, no bias update), the run
    goes on, and it ends where a single process that skips the same step ends."""
    engine = build_engine(fresh_model(cfg), cfg)
    objective = build_objective(cfg.objective, engine.model)
    norms, sums = [], []
    for step in range(1, 4):
        norms.append(one_step(engine, objective, my_batches(step, rank, world), step,
                              poisoned=(0,) if step == 2 and rank == 1 else ()))
        sums.append(rank_checksums(engine))
    result = {"norms": norms, "checksums": sums}
    state = full_params(engine)
    if rank == 0:
        plain_cfg = from_dict(TrainConfig, {**to_dict(cfg), "engine": "plain", "deepspeed": None,
                                            "grad_accum": ACCUM * world}, source="plain")
        plain = PlainEngine(fresh_model(plain_cfg), plain_cfg, torch.device("cpu"))
        plain_objective = build_objective(plain_cfg.objective, plain.model)
        result["plain_norms"] = [one_step(plain, plain_objective, global_batches(step, world), step,
                                          poisoned=(ACCUM,) if step == 2 else ()) for step in range(1, 4)]
        result["param_errors"] = update_errors(state, plain.model.state_dict(), fresh_model(cfg).state_dict())
    return result


class _NoData:
    """The data position of a run whose batches come from `global_batches` (nothing to resume)."""

    def state_dict(self) -> dict:
        return {}


def export_case(out: Path, model: str, steps: int, rank: int, world: int) -> None:
    from training.loop import save

    base = to_dict(config_for(3, "ordmoe", "sequential", steps, model))
    # shards (never read: the batches are `global_batches`): the model files take the model config's tokenizer
    cfg = from_dict(TrainConfig, {**base, "output_dir": str(out), "data": {**base["data"], "kind": "shards",
                                                                           "shards": str(out)}}, source="export")
    engine = build_engine(fresh_model(cfg), cfg)
    objective = build_objective(cfg.objective, engine.model)
    for step in range(1, steps + 1):
        norm = one_step(engine, objective, my_batches(step, rank, world), step)
    save(cfg, engine, _NoData(), steps, {"loss": 0.0, "grad_norm": norm})
    engine.model.eval()
    with torch.no_grad():
        logits = engine.model(**{k: v for k, v in global_batches(0, 1)[0].items() if k != "labels"}).logits
    if rank == 0:
        torch.save(logits, out / "training_logits.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", default="2:ntp:sequential,2:ordmoe:sequential,3:ordmoe:batched",
                        help="stage:objective:execution[:model], comma-separated")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--nan", default="", help="ZeRO stages to run the NaN case under, e.g. 2,3")
    parser.add_argument("--export", default=None, help="run directory: the export case instead (module doc)")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--demo-data", default=None, help="a demo dataset directory: batches of its samples")
    parser.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
    args = parser.parse_args()
    rank, _, world = launch_world()
    if args.export:
        export_case(Path(args.export), args.model, args.steps, rank, world)
        torch.distributed.barrier()
        return
    results = {"world_size": world, "cases": {}, "nan": {}}
    for spec in args.cases.split(","):
        stage, name, execution, *model = spec.split(":")
        cfg = config_for(int(stage), name, execution, args.steps, *model)
        if args.demo_data and not DEMO:
            load_demo(Path(args.demo_data), cfg)
        results["cases"][spec] = {**gradient_case(cfg, rank, world), **training_case(cfg, args.steps, rank, world)}
    for stage in filter(None, args.nan.split(",")):
        results["nan"][stage] = nan_case(config_for(int(stage), "ordmoe", "sequential", 3), rank, world)
    if rank == 0:
        Path(args.out).write_text(json.dumps(results, indent=1))
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
