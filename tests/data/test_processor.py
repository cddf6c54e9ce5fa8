"""The processor on real media: chat template, placeholder expansion, labels, truncation, errors."""
import pytest
import torch

from data.processor import IGNORE_INDEX, OmniProcessor, ProcessorError, collate


def convo(user, answer="Two cats."):
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": user},
            {"role": "assistant", "content": answer}]


def test_only_assistant_tokens_are_supervised(processor):
    example = processor({"id": "s", "conversation": convo("How many cats?")})
    ids, labels = example["input_ids"].tolist(), example["labels"].tolist()
    supervised = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    answer = processor.tokenizer.encode("Two cats.", add_special_tokens=False).ids + [processor.end_of_turn]
    assert [ids[i] for i in supervised] == answer
    assert supervised == list(range(len(ids) - len(answer), len(ids)))  # the answer closes the sequence
    assert [labels[i] for i in supervised] == answer


def test_image_marker_expands_to_the_encoders_token_count(processor, photo):
    example = processor({"id": "img", "conversation": convo("<image>\nHow many cats?"), "images": [photo]})
    start, patch, end = processor.token_ids["image"]
    ids = example["input_ids"]
    count = int((ids == patch).sum())
    assert count == int(example["image_grid_thw"].prod(-1).sum() // 4)
    first = int((ids == start).nonzero())
    assert ids[first + 1: first + 1 + count].eq(patch).all() and ids[first + 1 + count] == end
    assert example["modality_ids"][ids == patch].eq(1).all() and example["modality_ids"][ids != patch].eq(0).all()


def test_audio_and_video_markers(processor, speech, video_frames):
    example = processor({"id": "av", "conversation": convo("<video> and <audio>: what happens?"),
                         "videos": [video_frames], "audios": [speech]})
    ids, modality = example["input_ids"], example["modality_ids"]
    video_patch, audio_patch = processor.token_ids["video"][1], processor.token_ids["audio"][1]
    assert int((ids == video_patch).sum()) == int(example["video_grid_thw"].prod(-1).sum() // 4)
    frames = int(example["audio_frames_per_clip"][0])
    assert int((ids == audio_patch).sum()) == (frames - 1) // 2 + 1  # conv_audio: kernel 3, stride 2
    assert modality[ids == video_patch].eq(3).all() and modality[ids == audio_patch].eq(2).all()


def test_marker_and_media_counts_must_agree(processor, photo):
    with pytest.raises(ProcessorError, match=r"sample two: the conversation has 2 <image> marker\(s\) but the sample carries 1"):
        processor({"id": "two", "conversation": convo("<image><image> Same?"), "images": [photo]})
    with pytest.raises(ProcessorError, match="0 <image> marker"):
        processor({"id": "unused", "conversation": convo("Hi"), "images": [photo]})


def test_no_assistant_turn_is_for_inference_only(processor):
    sample = {"id": "q", "conversation": [{"role": "user", "content": "What is a tensor?"}]}
    with pytest.raises(ProcessorError, match="sample q: no assistant turn"):
        processor(sample)
    prompt = processor(sample, generation=True)
    suffix = processor.tokenizer.encode("<role>ASSISTANT</role>", add_special_tokens=False).ids
    assert prompt["input_ids"].tolist()[-len(suffix):] == suffix
    assert (prompt["labels"] == IGNORE_INDEX).all()


def test_truncation_drops_whole_turns_never_a_placeholder_span(tiny_omni, photo):
    model, config = tiny_omni
    conversation = convo("<image> Describe.", "A cat.") + [{"role": "user", "content": "And then? " * 40},
                                                           {"role": "assistant", "content": "More. " * 40}]
    full = OmniProcessor.for_model(model, config.tokenizer, 4096)({"id": "t", "conversation": conversation,
                                                                     "images": [photo]})
    limit = len(full["input_ids"]) - 10
    short = OmniProcessor.for_model(model, config.tokenizer, limit)({"id": "t", "conversation": conversation,
                                                                       "images": [photo]})
    patch = short["input_ids"] == OmniProcessor.for_model(model, config.tokenizer).token_ids["image"][1]
    assert int(patch.sum()) == int((full["input_ids"] == OmniProcessor.for_model(model, config.tokenizer)
                                    .token_ids["image"][1]).sum())
    assert len(short["input_ids"]) < limit and (short["labels"] != IGNORE_INDEX).any()
    with pytest.raises(ProcessorError, match="longer than max_length=20"):
        OmniProcessor.for_model(model, config.tokenizer, 20)({"id": "t", "conversation": conversation,
                                                               "images": [photo]})


def test_unknown_role_names_the_sample(processor):
    with pytest.raises(ProcessorError, match="sample r: unknown role 'bot'"):
        processor({"id": "r", "conversation": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]})


def test_collate_pads_and_concatenates_media(processor, photo, speech):
    examples = [processor({"id": "a", "conversation": convo("<image> Cats?"), "images": [photo]}),
                processor({"id": "b", "conversation": convo("Hi")}),
                processor({"id": "c", "conversation": convo("<audio> Said?"), "audios": [speech]})]
    batch = collate(examples, processor.pad_id)
    length = max(len(e["input_ids"]) for e in examples)
    assert batch["input_ids"].shape == (3, length) and batch["ids"] == ["a", "b", "c"]
    assert batch["attention_mask"].sum(-1).tolist() == [len(e["input_ids"]) for e in examples]
    assert (batch["labels"][1, len(examples[1]["input_ids"]):] == IGNORE_INDEX).all()
    assert torch.equal(batch["pixel_values"], examples[0]["pixel_values"])
    assert batch["audio_features"].shape[0] == 1
