"""The generation runner on the tiny omni model: batched = one-by-one token for token, per-sample errors,
the cache (resume, no regeneration), torchrun-style sharding over two gloo processes, tier plans restored."""
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from evaluation.benchmark import Sample
from evaluation.cache import PredictionCache, read_results
from evaluation.runner import MODEL_INPUTS_EXCLUDED, generate_batch, run_generation

QUESTIONS = ["How many cats are there in this picture?", "What?", "Describe the colours of everything you see in it.",
             "Name one object.", "Is it day or night outside, and why do you think so?"]


def image_samples(photo, diagram, count=5):
    images = [photo, diagram]
    samples = []
    for i in range(count):
        if i % 3 == 2:  # a text-only prompt among the image prompts
            samples.append(Sample(f"s{i}", [{"role": "user", "content": QUESTIONS[i % 5]}], answer="x"))
        else:
            samples.append(Sample(f"s{i}", [{"role": "user", "content": "<image>\n" + QUESTIONS[i % 5]}], answer="x",
                                  images=[images[i % 2]]))
    return samples


@pytest.fixture(scope="module")
def diagram(assets):
    from PIL import Image
    return Image.open(assets / "ai2d_00002168.png").convert("RGB")


def raw_tokens(model, processor, examples, max_new_tokens):
    batch = processor.collate(examples, padding_side="left")
    inputs = {k: v for k, v in batch.items() if k not in MODEL_INPUTS_EXCLUDED}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=processor.pad_id,
                             eos_token_id=processor.eos_id)
    return out[:, batch["input_ids"].shape[1]:].tolist()


def test_batched_generation_equals_one_by_one_token_for_token(tiny_omni, processor, photo, diagram):
    model, _ = tiny_omni
    examples = [processor(s.processor_input(), generation=True) for s in image_samples(photo, diagram, 4)]
    assert len({len(e["input_ids"]) for e in examples}) == len(examples)  # mixed lengths: real left padding
    batched = raw_tokens(model, processor, examples, 8)
    alone = [raw_tokens(model, processor, [example], 8)[0] for example in examples]
    for row, single in zip(batched, alone):
        # a row that stopped early is padded after its eos in the batch
        assert row[: len(single)] == single and all(t == processor.pad_id for t in row[len(single):])
    decoded = [processor.tokenizer.decode([t for t in s if t != processor.eos_id], skip_special_tokens=True).strip()
               for s in alone]
    assert generate_batch(model, processor, examples, 8) == decoded


def test_a_corrupt_image_is_an_error_of_that_sample_only(tiny_omni, processor, photo, diagram, tmp_path):
    model, _ = tiny_omni
    samples = image_samples(photo, diagram, 3)
    samples[1] = Sample("broken", [{"role": "user", "content": "<image>\nWhat?"}], answer="x", images=[b"not an image"])
    cache = PredictionCache(tmp_path, "fp", "bench", "vlmevalkit")
    results, stats = run_generation(model, processor, samples, cache, 4, batch_size=3, show_progress=False)
    assert [r.id for r in results] == ["s0", "broken", "s2"]
    assert results[1].prediction is None and "broken" in results[1].error
    assert stats.errors == 1 and stats.generated == 2


def test_the_cache_resumes_an_interrupted_run_and_never_regenerates(tiny_omni, processor, photo, diagram, tmp_path,
                                                                    monkeypatch):
    import evaluation.runner as runner
    model, _ = tiny_omni
    samples = image_samples(photo, diagram, 5)
    cache = PredictionCache(tmp_path, "fp", "bench", "vlmevalkit")
    real, calls = runner.generate_batch, {"n": 0}

    def dies_on_the_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "generate_batch", dies_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run_generation(model, processor, samples, cache, 4, batch_size=2, show_progress=False)
    assert [r.id for r in read_results(cache.part(0))] == ["s0", "s1"] and not cache.path.exists()
    with cache.part(0).open("a") as f:
        f.write('{"id": "s2", "predic')  # a kill mid-append leaves a torn line
    monkeypatch.setattr(runner, "generate_batch", real)
    results, stats = run_generation(model, processor, samples, cache, 4, batch_size=2, show_progress=False)
    assert (stats.cached, stats.generated) == (2, 3) and [r.id for r in results] == [s.id for s in samples]
    assert cache.path.is_file() and not cache.parts()
    again, stats = run_generation(model, processor, samples, cache, 4, batch_size=2, show_progress=False)
    assert (stats.cached, stats.generated) == (5, 0) and again == results


def _sharded_worker(rank, world, init_file, out_dir, return_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    import models  # noqa: F401
    from data.processor import OmniProcessor
    from models.build import build_model, load_model_config
    config = load_model_config("configs/models/tiny-omni.yaml")
    torch.manual_seed(0)
    model = build_model(config).eval()
    processor = OmniProcessor.for_model(model, config.tokenizer, config.max_length)
    samples = [Sample(f"t{i}", [{"role": "user", "content": q}], answer=str(i)) for i, q in enumerate(QUESTIONS)]
    cache = PredictionCache(out_dir, "fp", "bench", "vlmevalkit")
    results, stats = run_generation(model, processor, samples, cache, 3, batch_size=2, show_progress=False)
    with open(f"{return_file}.{rank}", "w") as f:
        json.dump({"results": [r.to_json() for r in results], "generated": stats.generated}, f)
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes import torch and build the model: ~10 s idle, a minute on a busy CPU
def test_two_gloo_ranks_share_the_samples_and_rank_0_gathers_all(tmp_path):
    mp.spawn(_sharded_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out"), str(tmp_path / "ret")), nprocs=2)
    rank0 = json.loads((tmp_path / "ret.0").read_text())
    rank1 = json.loads((tmp_path / "ret.1").read_text())
    assert [r["id"] for r in rank0["results"]] == [f"t{i}" for i in range(5)] and rank1["results"] == []
    assert rank0["generated"] == rank1["generated"] == 5  # summed over the ranks: nothing dropped, nothing twice
    merged = read_results(tmp_path / "out" / "predictions" / "fp" / "bench.vlmevalkit.jsonl")
    assert [r.id for r in merged] == [f"t{i}" for i in range(5)]
    assert not list((tmp_path / "out" / "predictions" / "fp").glob("*.rank*.jsonl"))


def test_tier_plans_are_restored_after_evaluating_tier_paths(tiny_omni):
    from evaluation.tier_paths import installed_plan, tier_plan_for
    from models.routing import TierRouting
    from models.tiers import TierConfig
    model, _ = tiny_omni
    assert getattr(model, "tier_routing", None) is None
    with installed_plan(model, tier_plan_for(model, TierConfig(num_tiers=3))) as routing:
        assert routing.plan.num_tiers == 3
    assert getattr(model, "tier_routing", None) is None  # attached for the block only
    routing = TierRouting.attach(model)
    training_plan = tier_plan_for(model, TierConfig(num_tiers=2))
    routing.set_plan(training_plan)
    try:
        with installed_plan(model, tier_plan_for(model, TierConfig(num_tiers=4))):
            assert model.tier_routing.plan.num_tiers == 4
        assert model.tier_routing.plan is training_plan
    finally:
        routing.detach()
        del model.tier_routing
