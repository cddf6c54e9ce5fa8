"""The processor: one sample (conversation + media) -> model inputs. Shared by training, evaluation
and inference, so a model always sees its inputs laid out the same way.

It applies the chat template (Ming style roles by default), expands every `<image>`, `<video>` and
`<audio>` marker to `<image>` + N x `<imagePatch>` + `</image>` with N the number of features the
encoder will produce for that item, supervises only assistant turns, and truncates by dropping whole
trailing turns (never through a placeholder span).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

from data.tokenizer import MEDIA_TOKENS, check_special_tokens

IGNORE_INDEX = -100
MODALITY_IDS = {"text": 0, "image": 1, "audio": 2, "video": 3}
MARKER = re.compile(r"(<image>|<video>|<audio>)")
MEDIA_KEYS = {"image": "images", "video": "videos", "audio": "audios"}


class ProcessorError(ValueError):
    """A sample cannot become model inputs; the message names the sample and the reason."""


@dataclass
class ChatTemplate:
    """Turn prefixes and the end-of-turn token. Default: Ming-Lite-Omni's `<role>HUMAN</role>` style."""

    system: str = "<role>SYSTEM</role>"
    user: str = "<role>HUMAN</role>"
    assistant: str = "<role>ASSISTANT</role>"
    end_of_turn: str = "<|endoftext|>"  # closes (and is supervised after) every assistant turn

    def prefix(self, role: str) -> str:
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"unknown role {role!r} (use system, user or assistant)")
        return getattr(self, role)


class OmniProcessor:
    """`processor(sample) -> example`; `sample = {"id", "conversation": [{"role", "content"}], "images": [PIL],
    "audios": [float32 16 kHz mono arrays], "videos": [uint8 frames [T, H, W, 3] or objects with `.frames`]}`."""

    def __init__(self, tokenizer: Tokenizer, vision: Any | None = None, audio: Any | None = None,
                 audio_tokens: Callable[[int], int] = lambda frames: frames, max_length: int = 2048,
                 template: ChatTemplate | None = None) -> None:
        check_special_tokens(tokenizer, "the processor's tokenizer")
        self.tokenizer = tokenizer
        self.vision, self.audio, self.audio_tokens = vision, audio, audio_tokens
        self.max_length = max_length
        self.template = template or ChatTemplate()
        self.token_ids = {name: tuple(tokenizer.token_to_id(t) for t in span) for name, span in MEDIA_TOKENS.items()}
        self.end_of_turn = tokenizer.token_to_id(self.template.end_of_turn)
        self.pad_id = tokenizer.token_to_id("<pad>")

    @classmethod
    def for_model(cls, model: Any, tokenizer: Tokenizer | str, max_length: int = 2048,
                  template: ChatTemplate | None = None) -> "OmniProcessor":
        """The processor matching an OmniModel: its encoders' preprocessing and its projector's token counts."""
        if not isinstance(tokenizer, Tokenizer):
            tokenizer = Tokenizer.from_file(str(tokenizer))
        vision = model.vision.preprocessor() if getattr(model, "vision", None) is not None else None
        audio = model.audio.preprocessor() if getattr(model, "audio", None) is not None else None
        return cls(tokenizer, vision, audio, model.audio_tokens, max_length, template)

    # ---- one sample ---------------------------------------------------------------------------------
    def __call__(self, sample: dict[str, Any], generation: bool = False) -> dict[str, Any]:
        """Model inputs for one sample. `generation=True` ends with the assistant prefix, for `generate`."""
        name = str(sample.get("id", "<unnamed sample>"))
        conversation = sample.get("conversation")
        if not conversation:
            raise ProcessorError(f"sample {name}: no conversation")
        if not generation and not any(turn.get("role") == "assistant" for turn in conversation):
            raise ProcessorError(f"sample {name}: no assistant turn, so nothing to learn (fine for inference: "
                                 f"call with generation=True)")
        media = {kind: list(sample.get(key) or []) for kind, key in MEDIA_KEYS.items()}
        self._check_marker_counts(name, conversation, media)
        inputs = {kind: self._preprocess(kind, items, name) for kind, items in media.items() if items}

        turns, used = [], {kind: 0 for kind in media}
        for turn in conversation:
            try:
                prefix = self.template.prefix(turn.get("role"))
            except ValueError as err:
                raise ProcessorError(f"sample {name}: {err}") from None
            tokens = self._turn_tokens(turn, prefix, inputs, used)
            turns.append((turn["role"], tokens, dict(used)))
        if generation:
            turns.append(("generation", self._text(self.template.assistant, False), dict(used)))
        kept = self._truncate(name, turns, generation)
        ids = [t for _, tokens, _ in kept for t in tokens[0]]
        labels = [t for _, tokens, _ in kept for t in tokens[1]]
        modality = [t for _, tokens, _ in kept for t in tokens[2]]
        counts = kept[-1][2]
        example: dict[str, Any] = {"id": name, "input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                                   "modality_ids": torch.tensor(modality)}
        example.update(self._media_tensors(inputs, counts))
        return example

    # ---- pieces ----------------------------------------------------------------------------------
    def _check_marker_counts(self, name: str, conversation: list[dict], media: dict[str, list]) -> None:
        for kind in media:
            markers = sum(str(turn.get("content", "")).count(f"<{kind}>") for turn in conversation)
            if markers != len(media[kind]):
                raise ProcessorError(f"sample {name}: the conversation has {markers} <{kind}> marker(s) but the "
                                     f"sample carries {len(media[kind])} {kind}(s)")

    def _preprocess(self, kind: str, items: list, name: str) -> list[tuple[Any, int]]:
        """Per item: (encoder inputs, number of placeholder tokens)."""
        if kind in ("image", "video") and self.vision is None or kind == "audio" and self.audio is None:
            raise ProcessorError(f"sample {name} has {kind} input but the model has no {kind} encoder")
        out = []
        for index, item in enumerate(items):
            try:
                if kind == "image":
                    if not isinstance(item, Image.Image):
                        raise TypeError(f"expected a PIL image, got {type(item).__name__}")
                    inputs = self.vision.images([item.convert("RGB")])
                    out.append((inputs, inputs.num_tokens[0]))
                elif kind == "video":
                    frames = np.asarray(getattr(item, "frames", item))
                    inputs = self.vision.video(frames)
                    out.append((inputs, inputs.num_tokens[0]))
                else:
                    inputs = self.audio([np.asarray(item, dtype=np.float32)])
                    out.append((inputs, self.audio_tokens(inputs.frames_per_clip[0])))
            except (TypeError, ValueError) as err:
                raise ProcessorError(f"sample {name}: {kind} {index}: {err}") from None
        return out

    def _text(self, text: str, supervised: bool) -> tuple[list[int], list[int], list[int]]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids if text else []
        return ids, ids if supervised else [IGNORE_INDEX] * len(ids), [0] * len(ids)

    def _turn_tokens(self, turn: dict, prefix: str, inputs: dict, used: dict) -> tuple[list, list, list]:
        ids, labels, modality = self._text(prefix, False)
        supervised = turn["role"] == "assistant"
        for part in MARKER.split(str(turn.get("content", ""))):
            if not part:
                continue
            if MARKER.fullmatch(part):
                kind = part[1:-1]
                start, patch, end = self.token_ids[kind]
                count = inputs[kind][used[kind]][1]
                used[kind] += 1
                ids += [start] + [patch] * count + [end]
                labels += [IGNORE_INDEX] * (count + 2)
                modality += [0] + [MODALITY_IDS[kind]] * count + [0]
            else:
                piece = self._text(part, supervised)
                ids, labels, modality = ids + piece[0], labels + piece[1], modality + piece[2]
        if supervised:
            ids, labels, modality = ids + [self.end_of_turn], labels + [self.end_of_turn], modality + [0]
        return ids, labels, modality

    def _truncate(self, name: str, turns: list, generation: bool) -> list:
        """Drop whole trailing exchanges until the sample fits; placeholder spans stay whole."""
        kept = list(turns)
        length = lambda ts: sum(len(t[1][0]) for t in ts)  # noqa: E731
        while length(kept) > self.max_length and len(kept) > 1:
            if generation:
                break  # the prompt is what it is: the model sees all of it or nothing
            kept.pop()
            while kept and kept[-1][0] != "assistant":
                kept.pop()
        if not kept or length(kept) > self.max_length:
            raise ProcessorError(f"sample {name}: {length(turns)} tokens, longer than max_length={self.max_length} "
                                 f"even after dropping trailing turns")
        return kept

    def _media_tensors(self, inputs: dict, counts: dict) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for kind, prefix in (("image", "image"), ("video", "video")):
            items = [item for item, _ in inputs.get(kind, [])[: counts[kind]]]
            if items:
                out[f"pixel_values{'' if kind == 'image' else '_videos'}"] = torch.cat([i.pixel_values for i in items])
                out[f"{prefix}_grid_thw"] = torch.cat([i.grid_thw for i in items])
        clips = [item for item, _ in inputs.get("audio", [])[: counts["audio"]]]
        if clips:
            out["audio_features"] = torch.cat([c.features for c in clips])
            out["audio_chunk_frames"] = torch.cat([c.chunk_frames for c in clips])
            out["audio_chunks_per_clip"] = torch.tensor([n for c in clips for n in c.chunks_per_clip])
            out["audio_frames_per_clip"] = torch.tensor([n for c in clips for n in c.frames_per_clip])
        return out


MEDIA_TENSORS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "audio_features",
                 "audio_chunk_frames", "audio_chunks_per_clip", "audio_frames_per_clip")


def collate(examples: list[dict[str, Any]], pad_id: int = 0) -> dict[str, Any]:
    """Right-pad the token tensors; concatenate media tensors in sample order; keep the sample ids."""
    length = max(len(e["input_ids"]) for e in examples)

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.stack([torch.nn.functional.pad(e[key], (0, length - len(e[key])), value=value) for e in examples])

    batch: dict[str, Any] = {"input_ids": pad("input_ids", pad_id), "labels": pad("labels", IGNORE_INDEX),
                             "modality_ids": pad("modality_ids", 0),
                             "attention_mask": torch.stack([(torch.arange(length) < len(e["input_ids"])).long()
                                                            for e in examples]),
                             "ids": [e.get("id") for e in examples]}
    for key in MEDIA_TENSORS:
        parts = [e[key] for e in examples if key in e]
        if parts:
            batch[key] = torch.cat(parts)
    return batch
