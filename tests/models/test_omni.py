"""The tiny omni model end to end: mixed batches, placeholder scatter, modality routers, save/load, generate."""
import json

import pytest
import torch

from data.processor import collate
from models.omni import OmniModel
from models.routing import TierRouting
from training.objectives import ObjectiveConfig, build_objective


def convo(user, answer):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


@pytest.fixture(scope="module")
def mixed_batch(processor, photo, speech, video_frames):
    samples = [
        {"id": "text", "conversation": convo("What is a tensor?", "An array.")},
        {"id": "image", "conversation": convo("<image>\nHow many cats?", "2"), "images": [photo]},
        {"id": "audio", "conversation": convo("<audio>\nTranscribe.", "She had your dark suit."), "audios": [speech]},
        {"id": "video", "conversation": convo("<video>\nWhat happens?", "Arm wrestling."), "videos": [video_frames]},
        {"id": "image+audio", "conversation": convo("<image><audio> Match?", "Yes."), "images": [photo],
         "audios": [speech]},
    ]
    return collate([processor(s) for s in samples], processor.pad_id)


@pytest.mark.parametrize("objective", ["ntp", "ordmoe"])
def test_mixed_batch_trains_with_both_objectives(tiny_omni, mixed_batch, objective):
    model, _ = tiny_omni
    model.zero_grad()
    result = build_objective(ObjectiveConfig(name=objective), model)(
        model, mixed_batch, backward=lambda loss: loss.backward(), step=50)
    assert torch.isfinite(torch.tensor(result.loss))
    for component in ("vision", "audio", "linear_proj", "linear_proj_audio", "model"):
        grads = [p.grad for p in getattr(model, component).parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), component
    if objective == "ordmoe":
        assert {"logp_tier1", "logp_tier2", "logp_tier3", "tier_order_agreement"} <= result.parts.keys()
    model.zero_grad()


def test_features_land_exactly_at_the_placeholders(tiny_omni, mixed_batch):
    model, _ = tiny_omni
    with torch.no_grad():
        embeds, _ = model.embed_inputs(mixed_batch)
        text = model.get_input_embeddings()(mixed_batch["input_ids"])
        image = model.linear_proj(model.vision.encode(mixed_batch["pixel_values"], mixed_batch["image_grid_thw"]))
        assert model.config.vision_projector["normalize"]  # Ming L2-normalises projected image features
        image = torch.nn.functional.normalize(image, dim=-1)
    ids = mixed_batch["input_ids"]
    for kind in ("image", "video", "audio"):
        mask = ids == model.config.placeholder_ids[kind]
        assert mask.any()
    image_positions = (ids == model.config.placeholder_ids["image"]).nonzero()
    for row, (b, t) in enumerate(image_positions.tolist()):
        torch.testing.assert_close(embeds[b, t], image[row])
    others = ~torch.isin(ids, torch.tensor(list(model.config.placeholder_ids.values())))
    assert torch.equal(embeds[others], text[others])


def test_placeholder_count_mismatch_names_both_counts_and_the_samples(tiny_omni, mixed_batch):
    model, _ = tiny_omni
    broken = dict(mixed_batch)
    ids = broken["input_ids"].clone()
    first = (ids == model.config.placeholder_ids["image"]).nonzero()[0]
    ids[first[0], first[1]] = 5  # one image placeholder too few
    broken["input_ids"] = ids
    with pytest.raises(ValueError, match=r"placeholder tokens but the image encoder gave (\d+) features.*sample image:"):
        model.embed_inputs(broken)


def test_modality_routers_route_image_and_audio_tokens(tiny_omni, mixed_batch):
    model, _ = tiny_omni
    routing = TierRouting.attach(model)
    gate = routing.routers[0][1]
    seen = {}
    handle = gate.register_forward_pre_hook(lambda module, args: seen.update(hidden=args[0], modality=args[1]))
    with torch.no_grad(), routing.path(1, record=True):
        model(**{k: v for k, v in mixed_batch.items() if k not in ("labels", "ids")})
    handle.remove()
    record = routing.recorded()[0]
    modality = seen["modality"]
    assert torch.equal(modality, mixed_batch["modality_ids"].reshape(-1))
    for kind_id, weight in ((0, gate.weight), (1, gate.image_weight), (2, gate.audio_weight)):
        rows = modality == kind_id
        assert rows.any()
        torch.testing.assert_close(record.logits[rows], seen["hidden"][rows].float() @ weight.float().T)


def test_save_pretrained_round_trip_gives_identical_outputs(tiny_omni, mixed_batch, tmp_path):
    model, _ = tiny_omni
    inputs = {k: v for k, v in mixed_batch.items() if k not in ("labels", "ids")}
    model.save_pretrained(tmp_path)
    loaded = OmniModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)


def test_kv_cache_generation_equals_no_cache_generation(tiny_omni, processor, photo, speech):
    model, _ = tiny_omni
    prompt = collate([processor({"id": "p", "conversation": [{"role": "user", "content": "<image><audio> Describe."}],
                                 "images": [photo], "audios": [speech]}, generation=True)], processor.pad_id)
    inputs = {k: v for k, v in prompt.items() if k not in ("labels", "ids")}
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape[1] == inputs["input_ids"].shape[1] + 6
    assert torch.equal(cached, uncached)


def generate(model, batch, max_new_tokens=6):
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "ids")}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    return out.sequences[:, batch["input_ids"].shape[1]:], torch.stack(out.logits, dim=1)


@pytest.fixture(scope="module")
def mixed_prompts(processor, photo, speech, assets):
    from PIL import Image
    chart = Image.open(assets / "mathvista_testmini_pid106.png").convert("RGB")
    samples = [
        {"id": "image", "conversation": [{"role": "user", "content": "<image>\nHow many cats are on the couch?"}],
         "images": [photo]},
        {"id": "text", "conversation": [{"role": "user", "content": "Hi"}]},
        {"id": "two-images", "conversation": [{"role": "user", "content": "<image> or <image>: which is a chart?"}],
         "images": [chart, photo.resize((120, 90))]},
        {"id": "audio", "conversation": [{"role": "user", "content": "<audio> Transcribe."}],
         "audios": [speech[:30_000]]},  # 1.9 s of it, a clip of its own length
    ]
    return [processor(s, generation=True) for s in samples]


def test_batched_left_padded_generation_equals_one_by_one(tiny_omni, processor, mixed_prompts):
    """Token for token, and the logits of every step: left padding, the attention mask, the position ids
    derived from it and the KV cache must leave each sample's computation unchanged."""
    model, _ = tiny_omni
    lengths = [len(e["input_ids"]) for e in mixed_prompts]
    assert len(set(lengths)) == len(lengths)  # mixed lengths: every row but the longest is padded
    batch = processor.collate(mixed_prompts, padding_side="left")
    batched_tokens, batched_logits = generate(model, batch)
    for row, example in enumerate(mixed_prompts):
        tokens, logits = generate(model, processor.collate([example], padding_side="left"))
        assert batched_tokens[row].tolist() == tokens[0].tolist(), example["id"]
        torch.testing.assert_close(batched_logits[row], logits[0], atol=1e-4, rtol=1e-4)


# ---- 3-D RoPE (Ming-Lite-Omni v1.5: rope_scaling {type: 3D}) ------------------------------------------------
@pytest.fixture(scope="module")
def tiny_omni_3d(tiny_omni):
    """tiny-omni with 3-D RoPE, same weights as the 1-D `tiny_omni`."""
    from dataclasses import replace

    from models.build import build_model
    model, config = tiny_omni
    backbone = replace(config.backbone, config={**config.backbone.config, "rope_scaling": {"type": "3D"}})
    model_3d = build_model(replace(config, backbone=backbone)).eval()
    model_3d.load_state_dict(model.state_dict())
    return model_3d


def test_text_only_models_keep_1d_rope_and_ming_v15_gets_3d(tiny_omni, tiny_omni_3d):
    from models.build import build_model
    from models.ling_lite import LingRope
    from models.rope import MultimodalRope
    assert type(build_model("configs/models/tiny-ling-lite.yaml").model.rotary_emb) is LingRope
    assert type(tiny_omni[0].model.model.rotary_emb) is LingRope and not tiny_omni[0].rope_3d
    assert isinstance(tiny_omni_3d.model.model.rotary_emb, MultimodalRope) and tiny_omni_3d.rope_3d


def test_3d_positions_change_image_logits_but_not_text_logits(tiny_omni, tiny_omni_3d, processor, mixed_prompts):
    model, _ = tiny_omni
    image, text = (processor.collate([e]) for e in mixed_prompts[:2])
    with torch.no_grad():
        for batch, same in ((text, True), (image, False)):
            inputs = {k: v for k, v in batch.items() if k not in ("labels", "ids")}
            one, three = model(**inputs).logits, tiny_omni_3d(**inputs).logits
            assert torch.allclose(one, three, atol=1e-5) is same


def test_3d_batched_left_padded_generation_equals_one_by_one(tiny_omni_3d, processor, mixed_prompts):
    batched_tokens, batched_logits = generate(tiny_omni_3d, processor.collate(mixed_prompts, padding_side="left"))
    for row, example in enumerate(mixed_prompts):
        tokens, logits = generate(tiny_omni_3d, processor.collate([example], padding_side="left"))
        assert batched_tokens[row].tolist() == tokens[0].tolist(), example["id"]
        torch.testing.assert_close(batched_logits[row], logits[0], atol=1e-4, rtol=1e-4)


def test_3d_kv_cache_continuation_equals_a_full_forward(tiny_omni_3d, processor, mixed_prompts):
    """Each generated token continues at the prompt's maximum position + 1, as one forward over the whole text."""
    prompt = processor.collate([mixed_prompts[2]], padding_side="left")  # two images
    new_tokens, step_logits = generate(tiny_omni_3d, prompt, max_new_tokens=4)
    full = dict(prompt, input_ids=torch.cat([prompt["input_ids"], new_tokens], dim=1),
                attention_mask=torch.ones(1, prompt["input_ids"].shape[1] + 4, dtype=torch.long))
    inputs = {k: v for k, v in full.items() if k not in ("labels", "ids")}
    positions = tiny_omni_3d.position_ids(inputs)
    length = prompt["input_ids"].shape[1]
    prompt_max = int(positions[1:, 0, :length].max())
    assert positions[1:, 0, length:].tolist() == [list(range(prompt_max + 1, prompt_max + 5))] * 3
    assert prompt_max + 1 < length  # image spans compress positions: 1-D positions would be wrong here
    with torch.no_grad():
        logits = tiny_omni_3d(**inputs).logits[0, length - 1:-1]
    torch.testing.assert_close(step_logits[0], logits, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        cached = tiny_omni_3d(**{k: v for k, v in prompt.items() if k not in ("labels", "ids")}, use_cache=True)
        with pytest.raises(ValueError, match="needs the new tokens' 3-D position_ids"):
            tiny_omni_3d(input_ids=new_tokens[:, :1], past_key_values=cached.past_key_values)


def test_3d_packed_samples_keep_their_own_positions_and_logits(tiny_omni_3d, processor, mixed_prompts):
    from data.batching import collate_packed
    examples = [mixed_prompts[0], mixed_prompts[2]]
    packed = collate_packed([examples], processor.pad_id, length=4096)
    assert "attention_mask" not in packed
    embeds, kwargs = tiny_omni_3d.embed_inputs(packed)
    with torch.no_grad():
        packed_logits = tiny_omni_3d(inputs_embeds=embeds, use_cache=False, **kwargs).logits[0]  # as the objectives
    start = 0
    for example in examples:
        alone = processor.collate([example])
        end = start + len(example["input_ids"])
        assert torch.equal(kwargs["position_ids"][1:, 0, start:end], tiny_omni_3d.position_ids(alone)[1:, 0])
        with torch.no_grad():
            logits = tiny_omni_3d(**{k: v for k, v in alone.items() if k not in ("labels", "ids")}).logits[0]
        torch.testing.assert_close(packed_logits[start:end], logits, atol=1e-4, rtol=1e-4)
        start = end


def test_video_frames_as_image_patches_land_in_their_own_span(tiny_omni, processor, photo, video_frames, tmp_path):
    """The Ming release tokenizer has no <videoPatch>: video frames are <imagePatch> inside <video>. The model tells
    the spans apart by their start token and computes what it computes with distinct patch tokens."""
    import json
    from dataclasses import replace

    from data.processor import OmniProcessor
    from data.tokenizer import TINY_TOKENIZER
    from models.build import build_model
    model, config = tiny_omni
    data = json.loads(TINY_TOKENIZER.read_text())
    for added in data["added_tokens"]:
        if added["content"] == "<videoPatch>":
            added["content"] = "<retired>"
    data["model"]["vocab"]["<retired>"] = data["model"]["vocab"].pop("<videoPatch>")
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    shared = build_model(replace(config, tokenizer=str(tmp_path / "tokenizer.json"))).eval()
    shared.load_state_dict(model.state_dict())
    assert shared.config.placeholder_ids["video"] == shared.config.placeholder_ids["image"]
    shared_processor = OmniProcessor.for_model(shared, tmp_path / "tokenizer.json", config.max_length)
    sample = {"id": "iv", "conversation": convo("<image> and <video>: same room?", "No."), "images": [photo],
              "videos": [video_frames[:4]]}
    batches = [p.collate([p(sample)]) for p in (processor, shared_processor)]
    video_start = shared.config.span_ids["video"][0]
    ids = batches[1]["input_ids"][0].tolist()
    assert ids[ids.index(video_start) + 1] == shared.config.placeholder_ids["image"]
    with torch.no_grad():
        logits = [m(**{k: v for k, v in b.items() if k not in ("labels", "ids")}).logits
                  for m, b in ((model, batches[0]), (shared, batches[1]))]
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)


def test_3d_ordmoe_batched_paths_equal_sequential_paths(tiny_omni_3d, mixed_batch):
    """The objective stacks tier paths along the batch: 3-D position ids [4, B, T] stack along their dim 1."""
    results = {}
    for execution in ("sequential", "batched"):
        objective = build_objective(ObjectiveConfig(name="ordmoe", execution=execution), tiny_omni_3d)
        results[execution] = objective(tiny_omni_3d, mixed_batch, backward=None, step=50)  # evaluation: no grads
    assert results["batched"].loss == pytest.approx(results["sequential"].loss, rel=1e-5)
