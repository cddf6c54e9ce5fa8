"""Our models as an lmms-eval model: `python -m lmms_eval --model ordmoe --model_args pretrained=RUN ...`.

lmms-eval 0.7 finds third-party models through the `lmms_eval.models` entry-point group
(`lmms_eval/models/registry_v2.py` `ModelRegistryV2.load_entrypoint_manifests`); setup.cfg declares
`ordmoe = evaluation.lmms_plugin:manifest`, which names `OrdMoELMM` as a "simple" model (a subclass of
`lmms_eval.api.model.lmms` with `is_simple = True`: it receives the task's prompt text and `doc_to_visual`).

- `generate_until`: greedy generation through the same processor and runner as tools/eval.py
  (evaluation/runner.py `generate_batch`: left padding, KV cache), so both give the same answer to the same
  question; the visuals a task gives (PIL images, video paths, `{"array", "sampling_rate"}` audio dicts, audio
  paths) become `<image>` / `<video>` / `<audio>` markers in front of the prompt, in order; `until` strings cut
  the answer as lmms-eval's models do. Sampling settings in `gen_kwargs` are ignored: decoding is greedy.
- `loglikelihood`: the summed log-probability of the continuation's tokens as the assistant's answer (after the
  chat template's assistant prefix), and whether greedy decoding would produce exactly them. The continuation's
  leading whitespace (lmms-eval's `target_delimiter`) is dropped: in a chat template the assistant prefix is
  the delimiter, and the model learned answers that start right after it.
- `generate_until_multi_round`: refused (UnsupportedRequest) before any work.
`model_args`: `pretrained` (a run, checkpoint or export directory, or a model YAML), `device` (default: cuda
when present), `batch_size`, `num_frames` (video frames; default the model's processor setting, the paper used
128), `max_new_tokens` (when a task's `gen_kwargs` gives none).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
except ImportError:  # one line, naming the extra (`from None`: no chained traceback)
    raise ImportError('the lmms-eval plugin needs lmms-eval: pip install -e ".[lmms]" && pip install --no-deps '
                      '-c constraints.txt lmms-eval (see README, "lmms-eval")') from None

import numpy as np
import torch
from PIL import Image

from data.media import load_audio, to_mono_16k
from data.processor import ProcessorError
from evaluation.runner import MODEL_INPUTS_EXCLUDED, generate_batch
from evaluation.video_media import VideoFrames
from training.export import load_trained
from training.losses import token_logprobs

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".gif", ".m4v")
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a")
MODEL_ARGS = ("pretrained", "device", "batch_size", "num_frames", "max_new_tokens")


class UnsupportedRequest(RuntimeError):
    """An lmms-eval request type our models do not serve; the message names the tasks and what to run instead."""


def manifest():
    """The entry point lmms-eval loads (setup.cfg `[options.entry_points] lmms_eval.models`)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="ordmoe", simple_class_path="evaluation.lmms_plugin.OrdMoELMM",
                         aliases=("ordmoe_omni",))


class OrdMoELMM(lmms):
    is_simple = True

    def __init__(self, pretrained: str, device: str | None = None, batch_size: int | str = 1,
                 num_frames: int | None = None, max_new_tokens: int = 64, **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(f"ordmoe: unknown model_args {', '.join(sorted(kwargs))} (known: {', '.join(MODEL_ARGS)})")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"ordmoe: batch_size must be a positive integer, got {batch_size!r} ('auto' is not "
                             f"supported)")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.processor = load_trained(pretrained, self.device)
        if self.processor is None:
            raise ValueError(f"ordmoe: {pretrained} has no tokenizer, so it cannot be prompted")
        self.batch_size = int(batch_size)
        self.num_frames = int(num_frames) if num_frames is not None else None
        self.max_new_tokens = int(max_new_tokens)

    # ---- requests -> samples ---------------------------------------------------------------------------
    def sample(self, context: str, visuals: list[Any], name: str) -> dict[str, Any]:
        """The processor's sample for a task prompt and its visuals (markers in front, in visual order)."""
        media: dict[str, list[Any]] = {"images": [], "videos": [], "audios": []}
        markers = []
        for visual in visuals:
            kind, item = self._media(visual, name)
            media[f"{kind}s"].append(item)
            markers.append(f"<{kind}>")
        prefix = "\n".join(markers) + "\n" if markers else ""
        return {"id": name, "conversation": [{"role": "user", "content": prefix + context}], **media}

    def _media(self, visual: Any, name: str) -> tuple[str, Any]:
        if isinstance(visual, Image.Image):
            return "image", visual.convert("RGB")
        if isinstance(visual, dict) and "array" in visual:
            wave = np.asarray(visual["array"], dtype=np.float32)
            return "audio", to_mono_16k(wave, int(visual.get("sampling_rate", 16000)), name)
        if isinstance(visual, (str, Path)):
            path = Path(visual)
            if path.suffix.lower() in AUDIO_SUFFIXES:
                return "audio", load_audio(path)
            if path.suffix.lower() in VIDEO_SUFFIXES or path.is_dir():
                return "video", VideoFrames(path, self.num_frames) if self.num_frames else str(path)
            return "image", str(path)
        raise TypeError(f"{name}: unsupported visual {type(visual).__name__} (PIL image, video/audio path, or "
                        f"{{'array', 'sampling_rate'}} audio)")

    def _visuals(self, doc_to_visual: Any, doc_id: Any, task: str, split: str) -> list[Any]:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        return [v for v in (visuals or []) if v is not None]

    # ---- lmms-eval API ---------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers: list[str | None] = [None] * len(requests)
        for chunk in _chunks(list(enumerate(requests)), self.batch_size):
            ready = []
            for index, request in chunk:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
                name = f"{task}/{split}/{doc_id}"
                try:
                    example = self.processor(self.sample(context, self._visuals(doc_to_visual, doc_id, task, split),
                                                         name), generation=True)
                except (ProcessorError, TypeError, ValueError) as err:  # this request only; lmms-eval wants a string
                    print(f"ordmoe: {err}")
                    answers[index] = ""
                    continue
                ready.append((index, example, dict(gen_kwargs or {})))
            # requests of one batch share max_new_tokens: the largest asked (each answer is cut at `until`)
            limit = max((int(k.get("max_new_tokens", self.max_new_tokens)) for _, _, k in ready), default=0)
            if ready:
                texts = generate_batch(self.model, self.processor, [e for _, e, _ in ready], limit, self.device)
                for (index, _, gen_kwargs), text in zip(ready, texts):
                    answers[index] = _cut(text, gen_kwargs.get("until"))
        return [a or "" for a in answers]

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        out = []
        for request in requests:
            # (context, continuation, doc_to_visual, doc_id, task, split); acc_mutual_info's unconditional
            # requests are (context, continuation) alone
            context, continuation, *where = request.args
            visuals, name = [], f"{request.task_name}/{request.doc_id}"
            if where:
                doc_to_visual, doc_id, task, split = where
                if not isinstance(continuation, str):  # a task's doc_to_target
                    continuation = continuation(self.task_dict[task][split][doc_id])
                visuals, name = self._visuals(doc_to_visual, doc_id, task, split), f"{task}/{split}/{doc_id}"
            out.append(self._continuation_logprob(self.sample(context, visuals, name), str(continuation).lstrip()))
        return out

    def _continuation_logprob(self, sample: dict[str, Any], continuation: str) -> tuple[float, bool]:
        target = self.processor.tokenizer.encode(continuation, add_special_tokens=False).ids
        if not target:
            return 0.0, True
        prompt = self.processor(sample, generation=True)
        example = dict(prompt)
        extra = torch.tensor(target, dtype=torch.long)
        example["input_ids"] = torch.cat([prompt["input_ids"], extra])
        example["labels"] = torch.cat([torch.full_like(prompt["input_ids"], -100), extra])
        example["modality_ids"] = torch.cat([prompt["modality_ids"], torch.zeros_like(extra)])
        batch = {k: v.to(self.device) for k, v in self.processor.collate([example]).items() if k != "ids"}
        logits = self.model(**{k: v for k, v in batch.items() if k not in MODEL_INPUTS_EXCLUDED}).logits
        logprobs, mask = token_logprobs(logits, batch["labels"])  # the training objective's log-probabilities
        greedy = logits[:, :-1].argmax(dim=-1) == batch["labels"][:, 1:]
        return float(logprobs[mask].sum()), bool(greedy[mask].all())

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        tasks = ", ".join(sorted({str(r.task_name) for r in requests})) or "?"
        raise UnsupportedRequest(f"ordmoe: task(s) {tasks} need generate_until_multi_round (multi-round "
                                 f"generation), which this plugin does not serve; run generate_until or "
                                 f"loglikelihood tasks")


def _cut(text: str, until: Any) -> str:
    """The answer up to the first `until` string (lmms-eval's stop sequences)."""
    stops = [until] if isinstance(until, str) else list(until or [])
    for stop in stops:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), max(size, 1)):
        yield items[start:start + max(size, 1)]
