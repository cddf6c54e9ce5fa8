"""The processor on real media with the tiny encoders: chat template, exact labels, placeholder expansion that
matches the encoders' real output sizes, truncation, errors, collation."""
import pytest
import torch

from data.media import load_image
from data.processor import IGNORE_INDEX, OmniProcessor, ProcessorError
from data.tokenizer import TINY_TOKENIZER
from encoders.audio import AudioInputs
from models.encoders import AUDIO_ENCODERS, VISION_ENCODERS, build_video_encoder
from models.projectors import build_projector

VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 48,
          "fullatt_block_indexes": [1], "min_pixels": 3136, "max_pixels": 12544}
AUDIO = {"d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 64}


@pytest.fixture(scope="module")
def encoders():
    torch.manual_seed(0)
    vision = VISION_ENCODERS.build("qwen2_5_vl", VISION).eval()
    audio = AUDIO_ENCODERS.build("whisper", AUDIO).eval()
    return vision, build_video_encoder(vision, {"temporal_pool": 2}), audio, build_projector("conv_audio", 32, 64)


def make_processor(encoders, **options):
    vision, video, audio, projector = encoders
    return OmniProcessor(TINY_TOKENIZER, image=vision.preprocessor(), video=video, audio=audio.preprocessor(),
                         audio_tokens=projector.num_tokens, **options)


@pytest.fixture(scope="module")
def processor(encoders):
    return make_processor(encoders, max_length=4096)


def encode(processor, text):
    return processor.tokenizer.encode(text, add_special_tokens=False).ids


def spans(ids, start, patch, end):
    """(position of the start token, patch count) of every span; checks each span is start, patches, end."""
    out = []
    for position in (ids == start).nonzero().flatten().tolist():
        count = 0
        while ids[position + 1 + count] == patch:
            count += 1
        assert ids[position + 1 + count] == end
        out.append((position, count))
    assert sum(c for _, c in out) == int((ids == patch).sum())
    return out


def test_only_assistant_turns_are_supervised_at_their_exact_positions(processor):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How many cats?"},
                    {"role": "assistant", "content": "Two cats."}, {"role": "user", "content": "And dogs?"},
                    {"role": "assistant", "content": "None."}]
    example = processor({"id": "s", "conversation": conversation})
    eos = processor.tokenizer.token_to_id("<|endoftext|>")
    pieces = [("<role>SYSTEM</role>", False), ("Be brief.", False), ("<role>HUMAN</role>", False),
              ("How many cats?", False), ("<role>ASSISTANT</role>", False), ("Two cats.", True), (None, True),
              ("<role>HUMAN</role>", False), ("And dogs?", False), ("<role>ASSISTANT</role>", False),
              ("None.", True), (None, True)]
    ids, labels = [], []
    for text, supervised in pieces:
        piece = [eos] if text is None else encode(processor, text)
        ids += piece
        labels += piece if supervised else [IGNORE_INDEX] * len(piece)
    assert example["input_ids"].tolist() == ids
    assert example["labels"].tolist() == labels
    assert example["modality_ids"].eq(0).all()
    assert processor.tokenizer.decode(example["input_ids"].tolist(), skip_special_tokens=False).startswith(
        "<role>SYSTEM</role>Be brief.<role>HUMAN</role>How many cats?<role>ASSISTANT</role>Two cats.<|endoftext|>")


def test_markers_expand_to_the_encoders_real_output_sizes(processor, encoders, assets):
    vision, video, audio, projector = encoders
    sample = {"id": "omni", "conversation": [
        {"role": "user", "content": "<image> and <image>, then <video>; listen: <audio> <audio>"},
        {"role": "assistant", "content": "Cats, a chart, a pancake, two speakers."}],
        "images": [assets / "coco_000000039769.png", load_image(assets / "mathvista_testmini_pid106.png")],
        "videos": [assets / "flipping_a_pancake.mkv"],
        "audios": [assets / "jfk.flac", (assets / "LDC93S1.wav").read_bytes()]}
    example = processor(sample)
    ids, modality = example["input_ids"], example["modality_ids"]
    with torch.no_grad():
        images = vision(example["pixel_values"], example["image_grid_thw"])
        videos = video(example["pixel_values_videos"], example["video_grid_thw"])
        inputs = AudioInputs(example["audio_features"], example["audio_chunk_frames"],
                             example["audio_chunks_per_clip"].tolist(), example["audio_frames_per_clip"].tolist())
        clips = audio(inputs).split(inputs.frames_per_clip)
        audio_tokens = [projector.project(clip).shape[0] for clip in clips]
    image_spans = spans(ids, *processor.token_ids["image"])
    assert [c for _, c in image_spans] == vision.num_tokens(example["image_grid_thw"])
    assert sum(c for _, c in image_spans) == images.shape[0]
    assert [c for _, c in spans(ids, *processor.token_ids["video"])] == [videos.shape[0]]
    assert [c for _, c in spans(ids, *processor.token_ids["audio"])] == audio_tokens
    assert len(example["audio_chunks_per_clip"]) == 2
    for kind, number in (("image", 1), ("audio", 2), ("video", 3)):
        start, patch, end = processor.token_ids[kind]
        assert modality[ids == patch].eq(number).all()
        assert modality[(ids == start) | (ids == end)].eq(0).all()
    assert (example["labels"][ids == processor.token_ids["image"][1]] == IGNORE_INDEX).all()


def test_video_audio_track_follows_its_video_span(encoders, assets):
    processor = make_processor(encoders, video_audio=True, num_frames=4)
    example = processor({"id": "va", "conversation": [{"role": "user", "content": "<video> What is cooking?"},
                                                      {"role": "assistant", "content": "A pancake."}],
                         "videos": [assets / "flipping_a_pancake.mkv"]})
    ids = example["input_ids"].tolist()
    video_end, audio_start = processor.token_ids["video"][2], processor.token_ids["audio"][0]
    assert ids[ids.index(video_end) + 1] == audio_start
    frames = int(example["audio_frames_per_clip"][0])
    assert ids.count(processor.token_ids["audio"][1]) == (frames - 1) // 2 + 1  # conv_audio: kernel 3, stride 2


def test_marker_and_media_counts_must_agree(processor, assets):
    photo = assets / "coco_000000039769.png"
    with pytest.raises(ProcessorError, match=r"sample two: the conversation has 2 <image> marker\(s\) but the sample "
                                             r"carries 1 image\(s\) in `images`"):
        processor({"id": "two", "conversation": [{"role": "user", "content": "<image><image> Same?"},
                                                 {"role": "assistant", "content": "Yes."}], "images": [photo]})
    with pytest.raises(ProcessorError, match=r"sample unused: the conversation has 0 <audio> marker\(s\) but the "
                                             r"sample carries 1 audio"):
        processor({"id": "unused", "conversation": [{"role": "user", "content": "Hi"},
                                                    {"role": "assistant", "content": "Hello."}], "audios": [photo]})


def test_no_assistant_turn_is_for_inference_only(processor):
    sample = {"id": "q", "conversation": [{"role": "user", "content": "What is a tensor?"}]}
    with pytest.raises(ProcessorError, match="sample q: no assistant turn"):
        processor(sample)
    prompt = processor(sample, generation=True)
    expected = (encode(processor, "<role>HUMAN</role>") + encode(processor, "What is a tensor?")
                + encode(processor, "<role>ASSISTANT</role>"))
    assert prompt["input_ids"].tolist() == expected
    assert (prompt["labels"] == IGNORE_INDEX).all()


def test_truncation_drops_whole_turns_with_their_media(encoders, assets):
    photo = assets / "coco_000000039769.png"
    conversation = [{"role": "user", "content": "<image> Describe."}, {"role": "assistant", "content": "A cat."},
                    {"role": "user", "content": "And this one? <image> " + "Look closely. " * 30},
                    {"role": "assistant", "content": "Another cat. " * 30}]
    sample = {"id": "t", "conversation": conversation, "images": [photo, photo]}
    full = make_processor(encoders, max_length=4096)(sample)
    patch = encoders[0].num_tokens(full["image_grid_thw"])[0]
    first_exchange = int(torch.nonzero(full["input_ids"] == 1)[0]) + 1  # up to the first <|endoftext|>
    for limit in (len(full["input_ids"]) - 1, first_exchange):
        short = make_processor(encoders, max_length=limit)(sample)
        assert len(short["input_ids"]) == first_exchange
        assert [c for _, c in spans(short["input_ids"], *make_processor(encoders).token_ids["image"])] == [patch]
        assert short["image_grid_thw"].shape[0] == 1 and short["pixel_values"].shape[0] == patch * 4
        assert short["input_ids"][-1] == 1 and short["labels"][-1] == 1
    with pytest.raises(ProcessorError, match=rf"sample t: {len(full['input_ids'])} tokens, longer than "
                                             rf"max_length={first_exchange - 1}"):
        make_processor(encoders, max_length=first_exchange - 1)(sample)
    with pytest.raises(ProcessorError, match="sample t: the prompt has .* a prompt is not truncated"):
        make_processor(encoders, max_length=first_exchange)(sample, generation=True)


def test_bad_samples_name_the_sample_and_the_problem_and_carry_a_reason(processor, tmp_path):
    """Each refusal names the sample and carries the reason the skip tally groups it by."""
    (tmp_path / "empty.png").write_bytes(b"")
    text_only = OmniProcessor(TINY_TOKENIZER)

    def turns(user: str, answer: str | None = "?") -> list[dict]:
        return [{"role": "user", "content": user}] + ([{"role": "assistant", "content": answer}] if answer else [])

    cases = [  # (processor, sample, message, reason)
        (processor, {"id": "e", "conversation": turns("<image>"), "images": [tmp_path / "empty.png"]},
         r"sample e: image 0: .*empty\.png: empty file", "empty_file"),
        (processor, {"id": "i", "conversation": turns("<image>"), "images": [7]},
         r"sample i: image 0: expected a decoded image", "unusable_media"),
        (processor, {"id": "r", "conversation": [{"role": "bot", "content": "x"}, *turns("y")[1:]]},
         r"sample r: turn 0 must be .*'bot'", "bad_conversation"),
        (processor, {"id": "s", "conversation": "hi"}, "sample s: `conversation` must be", "bad_conversation"),
        (processor, {"id": "q", "conversation": turns("Why?", None)}, "sample q: no assistant turn", "no_answer"),
        (processor, {"id": "m", "conversation": turns("<image><image>"), "images": [tmp_path / "empty.png"]},
         r"sample m: the conversation has 2 <image> marker\(s\)", "placeholder_mismatch"),
        (processor, {"id": "p", "conversation": turns("a <imagePatch> b")},
         "sample p: the user text contains placeholder tokens", "reserved_tokens"),
        (text_only, {"id": "a", "conversation": turns("<audio>"), "audios": [b"x"]},
         "sample a has audio input but the processor has no audio encoder", "no_encoder"),
        (processor, {"id": "l", "conversation": turns("Say it.", "word " * 5000)},
         "sample l: .* longer than max_length", "too_long"),
    ]
    for process, sample, message, reason in cases:
        with pytest.raises(ProcessorError, match=message) as raised:
            process(sample)
        assert raised.value.reason == reason, (sample["id"], raised.value.reason)


def test_ling2_template_closes_every_turn(encoders):
    processor = make_processor(encoders, template="ling2")
    example = processor({"id": "l", "conversation": [{"role": "user", "content": "Hi"},
                                                     {"role": "assistant", "content": "Hello."}]})
    role_end = processor.tokenizer.token_to_id("<|role_end|>")
    ids, labels = example["input_ids"].tolist(), example["labels"].tolist()
    assert ids.count(role_end) == 2 and ids[-1] == role_end == labels[-1] == processor.eos_id
    assert labels[ids.index(role_end)] == IGNORE_INDEX  # the user turn's closer is not supervised


def test_collate_pads_either_side_and_concatenates_media_in_order(processor, assets):
    photo, other = assets / "coco_000000039769.png", assets / "ai2d_00002168.png"
    examples = [processor({"id": "a", "conversation": [{"role": "user", "content": "<image> Cats?"},
                                                       {"role": "assistant", "content": "Two."}], "images": [photo]}),
                processor({"id": "b", "conversation": [{"role": "user", "content": "Hi"},
                                                       {"role": "assistant", "content": "Hello there."}]}),
                processor({"id": "c", "conversation": [{"role": "user", "content": "<image> What?"},
                                                       {"role": "assistant", "content": "A diagram."}],
                           "images": [other]})]
    lengths = [len(e["input_ids"]) for e in examples]
    right, left = processor.collate(examples), processor.collate(examples, padding_side="left")
    assert right["input_ids"].shape == left["input_ids"].shape == (3, max(lengths)) and right["ids"] == ["a", "b", "c"]
    assert right["attention_mask"].sum(-1).tolist() == lengths == left["attention_mask"].sum(-1).tolist()
    short = 1
    assert torch.equal(right["input_ids"][short, :lengths[short]], examples[short]["input_ids"])
    assert (right["input_ids"][short, lengths[short]:] == processor.pad_id).all()
    assert (right["labels"][short, lengths[short]:] == IGNORE_INDEX).all()
    assert torch.equal(left["input_ids"][short, -lengths[short]:], examples[short]["input_ids"])
    assert torch.equal(right["pixel_values"], torch.cat([examples[0]["pixel_values"], examples[2]["pixel_values"]]))
    assert torch.equal(right["image_grid_thw"], torch.cat([examples[0]["image_grid_thw"], examples[2]["image_grid_thw"]]))


def test_the_ming_release_tokenizer_goes_through_the_processor_unchanged(encoders, assets, tmp_path):
    """Its own ids for every span, video frames as <imagePatch> inside <video> ... </video> (processing_bailingmm.py
    `_expand_video_tokens`), and the release config's pad id."""
    from tests.data.test_tokenizer import MING_PAD_TOKEN_ID, MING_RELEASE_SPECIAL_TOKENS, write_ming_release_tokenizer
    vision, video, audio, projector = encoders
    path = write_ming_release_tokenizer(tmp_path / "tokenizer.json")
    processor = OmniProcessor(path, image=vision.preprocessor(), video=video, audio=audio.preprocessor(),
                              audio_tokens=projector.num_tokens, max_length=4096, pad_id=MING_PAD_TOKEN_ID)
    token = {name: i for i, name in MING_RELEASE_SPECIAL_TOKENS.items()}
    sample = {"id": "ming", "conversation": [
        {"role": "user", "content": "<video> then <image>, and <audio>?"}, {"role": "assistant", "content": "Yes."}],
        "videos": [assets / "flipping_a_pancake.mkv"], "images": [assets / "coco_000000039769.png"],
        "audios": [assets / "LDC93S1.wav"]}
    example = processor(sample)
    ids, modality = example["input_ids"].tolist(), example["modality_ids"].tolist()
    video_tokens = video.num_tokens(example["video_grid_thw"])[0]
    start, end = ids.index(token["<video>"]), ids.index(token["</video>"])
    assert ids[start + 1:end] == [token["<imagePatch>"]] * video_tokens
    assert modality[start + 1:end] == [3] * video_tokens  # routed and scattered as video, not image
    start, end = ids.index(token["<image>"]), ids.index(token["</image>"])
    assert ids[start + 1:end] == [token["<imagePatch>"]] * vision.num_tokens(example["image_grid_thw"])[0]
    assert set(modality[start + 1:end]) == {1}
    start, end = ids.index(token["<audio>"]), ids.index(token["</audio>"])
    assert ids[start + 1:end] == [token["<audioPatch>"]] * projector.num_tokens(int(example["audio_frames_per_clip"][0]))
    assert ids[0] == token["<role>"] and ids[-1] == token["<|endoftext|>"] == example["labels"][-1]
    first_turn = ids[:ids.index(token["</role>"]) + 1]
    assert processor.tokenizer.decode(first_turn, skip_special_tokens=False) == "<role>HUMAN</role>"
    short = processor({"id": "t", "conversation": [{"role": "user", "content": "Hi"}]}, generation=True)
    batch = processor.collate([example, short], padding_side="left")
    assert batch["input_ids"][1, 0] == MING_PAD_TOKEN_ID and batch["attention_mask"][1, 0] == 0
