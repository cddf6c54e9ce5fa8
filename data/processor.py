"""The processor: one sample (conversation + media) -> model inputs. Shared by training, evaluation and
inference, so a model always sees its inputs laid out the same way.

A sample is `{"id": str, "conversation": [{"role": "system" | "user" | "assistant", "content": str}],
"images": [...], "audios": [...], "videos": [...]}`; `content` holds `<image>`, `<audio>`, `<video>` markers,
matched in order with the media lists. Media items are decoded objects (PIL image; float32 16 kHz mono
waveform; uint8 frames [T, H, W, 3] or a `VideoClip`), a path / bytes that data/media.py decodes, or a
lazy reference whose `load()` returns one of those (decoded only when the sample is processed, so a benchmark
of a thousand videos holds no frames until its batch comes).

The processor applies the chat template (Ming-Lite-Omni's `<role>HUMAN</role>` style by default), expands
every marker to `<image>` + N x `<imagePatch>` + `</image>` (likewise audio; a video becomes `<video>` + N x
`<videoPatch>` + `</video>`, or `<imagePatch>` inside `<video>` with a tokenizer that has no `<videoPatch>`, as
Ming's release) with N the number of features the encoder and projector will produce for that very item, supervises only assistant turns
(labels -100 elsewhere), gives every token its modality id (0 text, 1 image, 2 audio, 3 video: the patch
tokens carry their modality, the span delimiters are text) and truncates by dropping whole trailing
turns, never through a placeholder span.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

from data.media import MediaError, VideoClip, load_audio, load_image, load_video
from data.tokenizer import (EOS_TOKEN, MEDIA_TOKENS, check_special_tokens, load_tokenizer, media_token_ids,
                            pad_token_id)
from encoders.video import VideoEncoder

IGNORE_INDEX = -100
MODALITY_IDS = {"text": 0, "image": 1, "audio": 2, "video": 3}
MARKER = re.compile(r"(<image>|<video>|<audio>)")
MEDIA_KEYS = {"image": "images", "video": "videos", "audio": "audios"}
ROLES = ("system", "user", "assistant")


class ProcessorError(ValueError):
    """A sample cannot become model inputs; the message names the sample, `reason` is its skip-tally key
    (`bad_conversation`, `no_answer`, `placeholder_mismatch`, `reserved_tokens`, `no_encoder`, `too_long`,
    `prompt_too_long`, or a media item's own reason such as `undecodable_image`)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # an exception with extra init args must say how to pickle it (DataLoader workers)
        return type(self), (str(self), self.reason)


@dataclass
class ChatTemplate:
    """Turn prefixes and closers. Default: Ming-Lite-Omni's Ling-lite format,
    `<role>SYSTEM</role>...<role>HUMAN</role>...<role>ASSISTANT</role>...<|endoftext|>`."""

    system: str = "<role>SYSTEM</role>"
    user: str = "<role>HUMAN</role>"
    assistant: str = "<role>ASSISTANT</role>"
    end_of_turn: str = ""  # closes system and user turns (not supervised)
    end_of_answer: str = EOS_TOKEN  # closes assistant turns (supervised: the model learns to stop)

    def prefix(self, role: str) -> str:
        return getattr(self, role)


TEMPLATES = {
    "ming": ChatTemplate(),
    # Ling-2.0 (ling-mini-omni): every turn ends with <|role_end|>
    "ling2": ChatTemplate(end_of_turn="<|role_end|>", end_of_answer="<|role_end|>"),
}


@dataclass
class _Turn:
    role: str
    ids: list[int]
    labels: list[int]
    modality: list[int]
    media_used: dict[str, int]  # media items of each kind consumed up to and including this turn


class OmniProcessor:
    """`processor(sample, generation=False) -> example` (see the module docstring) and `collate(examples)`.

    `image`: `.images([PIL]) -> VisionInputs` (a vision encoder's `preprocessor()`); `video`: `.preprocess(frames)
    -> VisionInputs` (encoders.video.VideoEncoder); `audio`: `([waveform]) -> AudioInputs` (the audio encoder's
    `preprocessor()`); `audio_tokens`: encoder frames -> placeholder count (the audio projector's `num_tokens`).
    `video_audio`: a video's audio track becomes an audio span right after its video span.
    The tokenizer (a release's `tokenizer.json` unchanged, or ours) needs eos, the role markers and the span
    tokens of the media kinds the processor has encoders for. `pad_id`: the release config's `pad_token_id`
    (default `<pad>`, else `<|endoftext|>`).
    """

    def __init__(self, tokenizer: Tokenizer | str | Path, image: Any | None = None, video: Any | None = None,
                 audio: Callable | None = None, audio_tokens: Callable[[int], int] | None = None,
                 max_length: int = 2048, template: ChatTemplate | str = "ming", num_frames: int = 8,
                 video_audio: bool = False, pad_id: int | None = None) -> None:
        kinds = tuple(kind for kind, encoder in (("image", image), ("video", video), ("audio", audio)) if encoder)
        source = "the processor's tokenizer"
        if not isinstance(tokenizer, Tokenizer):
            source, tokenizer = str(tokenizer), load_tokenizer(tokenizer, kinds)
        check_special_tokens(tokenizer, source, kinds)
        if isinstance(template, str):
            if template not in TEMPLATES:
                raise ValueError(f"unknown chat template {template!r}; known: {', '.join(TEMPLATES)}")
            template = TEMPLATES[template]
        for text in (template.end_of_turn, template.end_of_answer):
            if text and len(tokenizer.encode(text, add_special_tokens=False).ids) != 1:
                raise ValueError(f"chat template token {text!r} is not a single token of this tokenizer")
        self.tokenizer, self.template = tokenizer, template
        self.image, self.video, self.audio = image, video, audio
        self.audio_tokens = audio_tokens or (lambda frames: frames)
        self.max_length, self.num_frames, self.video_audio = max_length, num_frames, video_audio
        self.token_ids = media_token_ids(tokenizer, source, kinds)  # kind -> (start, patch, end) ids
        # only the processor writes span tokens: any the tokenizer has are refused in text
        self.reserved_ids = {tokenizer.token_to_id(t) for span in MEDIA_TOKENS.values() for t in span} - {None}
        self.pad_id = pad_id if pad_id is not None else pad_token_id(tokenizer)
        self.eos_id = tokenizer.token_to_id(template.end_of_answer or EOS_TOKEN)

    @classmethod
    def for_model(cls, model: Any, tokenizer: Tokenizer | str | Path, max_length: int = 2048,
                  template: ChatTemplate | str = "ming", num_frames: int = 8, video_audio: bool = False,
                  temporal_pool: int = 1) -> "OmniProcessor":
        """The processor matching an OmniModel (attributes `vision`, `audio`, optional `video`, and
        `linear_proj_audio` or `audio_tokens`): its encoders' preprocessing and its projector's token counts."""
        vision = getattr(model, "vision", None)
        audio = getattr(model, "audio", None)
        video = getattr(model, "video", None)
        if video is None and vision is not None:
            video = VideoEncoder(vision, temporal_pool)
        audio_tokens = getattr(model, "audio_tokens", None)
        if audio_tokens is None and getattr(model, "linear_proj_audio", None) is not None:
            audio_tokens = model.linear_proj_audio.num_tokens
        pad_id = getattr(getattr(model, "config", None), "pad_token_id", None)
        return cls(tokenizer, image=vision.preprocessor() if vision is not None else None, video=video,
                   audio=audio.preprocessor() if audio is not None else None, audio_tokens=audio_tokens,
                   max_length=max_length, template=template, num_frames=num_frames, video_audio=video_audio,
                   pad_id=pad_id)

    # ---- one sample -----------------------------------------------------------------------------------
    def __call__(self, sample: dict[str, Any], generation: bool = False) -> dict[str, Any]:
        """Model inputs for one sample. `generation=True`: the prompt for `generate` (ends with the assistant
        prefix; a conversation without an assistant turn is fine); otherwise training inputs, which need one."""
        name = str(sample.get("id", "<unnamed sample>"))
        conversation = sample.get("conversation")
        if not isinstance(conversation, list) or not conversation:
            raise ProcessorError(f"sample {name}: `conversation` must be a non-empty list of turns", "bad_conversation")
        for index, turn in enumerate(conversation):
            if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
                raise ProcessorError(f"sample {name}: turn {index} must be {{'role': one of {list(ROLES)}, "
                                     f"'content': str}}, got {turn!r:.120}", "bad_conversation")
        if not generation and not any(turn["role"] == "assistant" for turn in conversation):
            raise ProcessorError(f"sample {name}: no assistant turn, so nothing to learn (for inference, call "
                                 f"with generation=True)", "no_answer")
        media = {kind: list(sample.get(key) or []) for kind, key in MEDIA_KEYS.items()}
        self._check_marker_counts(name, conversation, media)

        inputs: dict[str, list] = {kind: [] for kind in MEDIA_KEYS}  # encoder inputs in sequence order
        used = {kind: 0 for kind in MEDIA_KEYS}
        turns = [self._turn(name, turn, media, inputs, used) for turn in conversation]
        if generation:
            ids = self._encode(self.template.assistant)
            turns.append(_Turn("generation", ids, [IGNORE_INDEX] * len(ids), [0] * len(ids), dict(used)))
        kept = self._truncate(name, turns, generation)
        example: dict[str, Any] = {
            "id": name,
            "input_ids": torch.tensor([t for turn in kept for t in turn.ids], dtype=torch.long),
            "labels": torch.tensor([t for turn in kept for t in turn.labels], dtype=torch.long),
            "modality_ids": torch.tensor([t for turn in kept for t in turn.modality], dtype=torch.long),
        }
        kept_counts = kept[-1].media_used  # media of dropped turns is dropped with them
        example.update(self._media_tensors({kind: items[: kept_counts[kind]] for kind, items in inputs.items()}))
        return example

    def collate(self, examples: list[dict[str, Any]], padding_side: Literal["right", "left"] = "right") -> dict:
        return collate(examples, self.pad_id, padding_side)

    # ---- pieces ---------------------------------------------------------------------------------------
    def _check_marker_counts(self, name: str, conversation: list[dict], media: dict[str, list]) -> None:
        for kind, key in MEDIA_KEYS.items():
            markers = sum(turn["content"].count(f"<{kind}>") for turn in conversation)
            if markers != len(media[kind]):
                raise ProcessorError(f"sample {name}: the conversation has {markers} <{kind}> marker(s) but the "
                                     f"sample carries {len(media[kind])} {kind}(s) in `{key}`",
                                     "placeholder_mismatch")

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids if text else []

    def _turn(self, name: str, turn: dict, media: dict, inputs: dict, used: dict) -> _Turn:
        role, supervised = turn["role"], turn["role"] == "assistant"
        ids = self._encode(self.template.prefix(role))
        labels, modality = [IGNORE_INDEX] * len(ids), [0] * len(ids)

        def add_span(kind: str, item_inputs: Any, count: int) -> None:
            start, patch, end = self.token_ids[kind]
            ids.extend([start] + [patch] * count + [end])
            labels.extend([IGNORE_INDEX] * (count + 2))
            modality.extend([0] + [MODALITY_IDS[kind]] * count + [0])
            inputs[kind].append(item_inputs)

        for part in MARKER.split(turn["content"]):
            if not part:
                continue
            if not MARKER.fullmatch(part):
                piece = self._encode(part)
                if self.reserved_ids.intersection(piece):  # a stray <imagePatch> would break the feature scatter
                    raise ProcessorError(f"sample {name}: the {role} text contains placeholder tokens "
                                         f"({', '.join(t for span in MEDIA_TOKENS.values() for t in span)} are "
                                         f"reserved; write <image>, <video>, <audio> markers only)",
                                         "reserved_tokens")
                ids.extend(piece)
                labels.extend(piece if supervised else [IGNORE_INDEX] * len(piece))
                modality.extend([0] * len(piece))
                continue
            kind = part[1:-1]
            index = used[kind]
            used[kind] += 1
            try:
                for span_kind, item_inputs, count in self._preprocess(kind, media[kind][index], name, index):
                    add_span(span_kind, item_inputs, count)
            except ProcessorError:
                raise
            except (MediaError, TypeError, ValueError) as err:  # the media's own reason, when it has one
                raise ProcessorError(f"sample {name}: {kind} {index}: {err}",
                                     getattr(err, "reason", "unusable_media")) from None
        closer = self.template.end_of_answer if supervised else self.template.end_of_turn
        if closer:
            closing = self._encode(closer)
            ids.extend(closing)
            labels.extend(closing if supervised else [IGNORE_INDEX] * len(closing))
            modality.extend([0] * len(closing))
        return _Turn(role, ids, labels, modality, {k: len(v) for k, v in inputs.items()})

    def _preprocess(self, kind: str, item: Any, name: str, index: int) -> list[tuple[str, Any, int]]:
        """(span kind, encoder inputs, placeholder count) for one media item: one span, or for a video with
        `video_audio`, its video span and then its audio span."""
        encoder = {"image": self.image, "video": self.video, "audio": self.audio}[kind]
        if encoder is None:
            raise ProcessorError(f"sample {name} has {kind} input but the processor has no {kind} encoder",
                                 "no_encoder")
        label = f"{name}/{kind}{index}"
        if callable(getattr(item, "load", None)) and not isinstance(item, Image.Image):  # a lazy reference (e.g.
            # evaluation/video_media.py): decode now. PIL images have a load() too: they are decoded already
            item = item.load()
        if kind == "image":
            image = item if isinstance(item, Image.Image) else load_image(_source(item, "image"), name=_name(item, label))
            inputs = self.image.images([image])
            return [("image", inputs, inputs.num_tokens[0])]
        if kind == "audio":
            wave = item if isinstance(item, np.ndarray) else load_audio(_source(item, "audio"), name=_name(item, label))
            return [("audio", *self._audio(wave))]
        if isinstance(item, np.ndarray):
            clip = VideoClip(frames=item, indices=list(range(len(item))), total_frames=len(item), fps=0.0)
        elif isinstance(item, VideoClip):
            clip = item
        else:
            clip = load_video(_source(item, "video"), self.num_frames, name=_name(item, label),
                              with_audio=self.video_audio)
        inputs = self.video.preprocess(clip.frames)
        spans = [("video", inputs, inputs.num_tokens[0])]
        if self.video_audio and clip.audio is not None:
            if self.audio is None:
                raise ProcessorError(f"sample {name}: video_audio is on but the processor has no audio encoder",
                                     "no_encoder")
            spans.append(("audio", *self._audio(clip.audio)))
        return spans

    def _audio(self, wave: np.ndarray) -> tuple[Any, int]:
        inputs = self.audio([wave])
        return inputs, self.audio_tokens(inputs.frames_per_clip[0])

    def _truncate(self, name: str, turns: list[_Turn], generation: bool) -> list[_Turn]:
        """Drop whole trailing turns until the sample fits; a training sample must still end with an answer."""
        total = sum(len(turn.ids) for turn in turns)
        if total <= self.max_length:
            return turns
        if generation:
            raise ProcessorError(f"sample {name}: the prompt has {total} tokens, more than max_length="
                                 f"{self.max_length}; a prompt is not truncated (shorten it or raise max_length)",
                                 "prompt_too_long")
        kept = list(turns)
        while kept and (sum(len(turn.ids) for turn in kept) > self.max_length or kept[-1].role != "assistant"):
            kept.pop()
        if not kept:
            raise ProcessorError(f"sample {name}: {total} tokens, longer than max_length={self.max_length}, and no "
                                 f"leading run of whole turns ending with an assistant turn fits", "too_long")
        return kept

    @staticmethod
    def _media_tensors(inputs: dict[str, list]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        images, videos, clips = inputs["image"], inputs["video"], inputs["audio"]
        if images:
            out["pixel_values"] = torch.cat([i.pixel_values for i in images])
            out["image_grid_thw"] = torch.cat([i.grid_thw for i in images])
        if videos:
            out["pixel_values_videos"] = torch.cat([v.pixel_values for v in videos])
            out["video_grid_thw"] = torch.cat([v.grid_thw for v in videos])
        if clips:
            out["audio_features"] = torch.cat([c.features for c in clips])
            out["audio_chunk_frames"] = torch.cat([c.chunk_frames for c in clips])
            out["audio_chunks_per_clip"] = torch.tensor([n for c in clips for n in c.chunks_per_clip])
            out["audio_frames_per_clip"] = torch.tensor([n for c in clips for n in c.frames_per_clip])
        return out


def _source(item: Any, kind: str) -> Any:
    if isinstance(item, (str, Path, bytes, bytearray)):
        return item
    raise TypeError(f"expected a decoded {kind} or a path / bytes, got {type(item).__name__}")


def _name(item: Any, label: str) -> str:
    return str(item) if isinstance(item, (str, Path)) else label


# ---- batches ----------------------------------------------------------------------------------------------
MEDIA_TENSORS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "audio_features",
                 "audio_chunk_frames", "audio_chunks_per_clip", "audio_frames_per_clip")


def collate(examples: list[dict[str, Any]], pad_id: int, padding_side: Literal["right", "left"] = "right") -> dict:
    """Pad the token tensors (right for training, left for batched generation), concatenate the media tensors
    in sample order, keep the sample ids. `attention_mask` is 1 on real tokens."""
    if not examples:
        raise ValueError("collate needs at least one example")
    length = max(len(e["input_ids"]) for e in examples)

    def pad(key: str, value: int) -> torch.Tensor:
        rows = []
        for e in examples:
            missing = length - len(e[key])
            rows.append(torch.nn.functional.pad(e[key], (missing, 0) if padding_side == "left" else (0, missing),
                                                value=value))
        return torch.stack(rows)

    examples = [dict(e, attention_mask=torch.ones_like(e["input_ids"])) for e in examples]
    batch: dict[str, Any] = {
        "input_ids": pad("input_ids", pad_id),
        "labels": pad("labels", IGNORE_INDEX),
        "modality_ids": pad("modality_ids", MODALITY_IDS["text"]),
        "attention_mask": pad("attention_mask", 0),
        "ids": [e.get("id") for e in examples],
    }
    for key in MEDIA_TENSORS:
        parts = [e[key] for e in examples if key in e]
        if parts:
            batch[key] = torch.cat(parts)
    return batch
