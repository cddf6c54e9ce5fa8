"""Released checkpoints, built from their own directory (DESIGN.md, "Released checkpoints").

    build_model("path/to/Ming-Lite-Omni-1.5")     # or a model YAML holding `release: <directory or hub id>`

A release directory is what its authors publish, unmodified: `config.json`, the safetensors shards and
`model.safetensors.index.json` (or one `model.safetensors`), `tokenizer.json` + `tokenizer_config.json`, and
for Ming-Lite-Omni `preprocessor_config.json` and the audio front end's `am.mvn`. `release_model_config`
translates `config.json` field by field into the mapping of a model YAML (models/build.py `ModelConfig`):

- a field of the official configuration class is passed on to our config class, which declares the same
  fields with the same defaults (models/ling_lite.py, models/ling_mini.py), so an absent field means what
  it means to the official code;
- transformers 4's generic `PretrainedConfig` attributes that `save_pretrained` writes into every
  config.json (bookkeeping, and generation defaults that never enter the forward) are taken as that; a
  generation default with a non-default value is named in a warning, since it is not applied here;
- fields the official modeling code does not read either are named below with that reason;
- everything else is refused, naming the file and the field; so is a value we do not implement.

Families: Ling-lite / Ling-lite-1.5 (`BailingMoeForCausalLM`), Ling-mini-2.0 (`BailingMoeV2ForCausalLM`),
Ming-Lite-Omni v1 and v1.5 (`BailingMMNativeForConditionalGeneration`, whose config.json nests
`llm_config`, `vision_config`, `audio_config`, and for v1 `whisper_config`). On the meta device (parameter
counts) only config.json is read; `check_release_files` runs when weights are loaded.
"""
from __future__ import annotations

import difflib
import inspect
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

from models.config import ConfigError

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
PREPROCESSOR_FILE = "preprocessor_config.json"
SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

LING_LITE, LING_MINI, MING = "BailingMoeForCausalLM", "BailingMoeV2ForCausalLM", "BailingMMNativeForConditionalGeneration"
ARCHITECTURES = (LING_LITE, LING_MINI, MING)

# transformers 4.x `PretrainedConfig` attributes (`to_dict()` writes them into every config.json, e.g. the
# Ming release's, saved by 4.45): bookkeeping that no forward reads.
GENERIC_FIELDS = frozenset({
    "_name_or_path", "add_cross_attention", "architectures", "auto_map", "chunk_size_feed_forward",
    "cross_attention_hidden_size", "decoder_start_token_id", "finetuning_task", "id2label", "is_decoder",
    "is_encoder_decoder", "label2id", "model_type", "output_attentions", "output_hidden_states", "prefix",
    "problem_type", "pruned_heads", "return_dict", "sep_token_id", "task_specific_params", "tf_legacy_loss",
    "tie_encoder_decoder", "tokenizer_class", "torch_dtype", "dtype", "torchscript", "transformers_version",
    "use_bfloat16", "bos_token_id", "_attn_implementation", "attn_implementation",
})
# ... and its generation defaults, with transformers 4's default values: only `generate` reads them.
GENERATION_DEFAULTS: dict[str, Any] = {
    "bad_words_ids": None, "begin_suppress_tokens": None, "diversity_penalty": 0.0, "do_sample": False,
    "early_stopping": False, "encoder_no_repeat_ngram_size": 0, "exponential_decay_length_penalty": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "length_penalty": 1.0, "max_length": 20,
    "min_length": 0, "no_repeat_ngram_size": 0, "num_beam_groups": 1, "num_beams": 1,
    "num_return_sequences": 1, "output_scores": False, "remove_invalid_values": False, "repetition_penalty": 1.0,
    "return_dict_in_generate": False, "suppress_tokens": None, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
    "typical_p": 1.0,
}
REFUSED_FIELDS = {"quantization_config": "quantized releases are not supported; use the bf16 release"}

# Fields of the LLM configs that no official modeling code reads (so ignoring them computes the same numbers).
LLM_INERT = {
    "norm_softmax": "Ming's modeling_bailing_moe.py never reads it",
    "pretraining_tp": "no Bailing modeling code reads it (a Llama-era field)",
    "use_rmsnorm": "the official Bailing models always use RMSNorm",
}
# Ming's `vision_config`: Qwen2_5_VLVisionConfig fields (Ming qwen2_5_vit.py; same defaults as transformers').
VISION_FIELDS = ("depth", "hidden_size", "hidden_act", "intermediate_size", "num_heads", "in_channels", "patch_size",
                 "spatial_merge_size", "temporal_patch_size", "tokens_per_second", "window_size", "out_hidden_size",
                 "fullatt_block_indexes")
VISION_ALIASES = {"in_chans": "in_channels", "spatial_patch_size": "patch_size"}  # duplicates: must agree
VISION_INERT = {"tie_word_embeddings": "a vision tower has no word embeddings"}
# v1's SANM audio encoder (GLMAudioConfig, configuration_audio.py): not built here (see `_audio_sections`).
SANM_FIELDS = frozenset({"audio_encoder_output_size", "audio_decoder_type", "audio_id_shift", "vocab_size_audio",
                         "use_audio_bpe_token", "ds_conv_type", "audio_wav_frontend_config_sanm",
                         "audio_encoder_config_sanm"})
WHISPER_DIMS = ("n_mels", "n_ctx", "n_state", "n_head", "n_layer")  # openai-whisper AudioEncoder arguments


# --------------------------------------------------------------------------------------------------
# Locating a release


class ReleaseNotFound(ConfigError):
    """A hub release that is not on this machine (not a directory, not in the local cache): the config may be
    right, the weights are just not downloaded yet."""


def resolve_release(name: str, relative_to: Path | None = None, source: str = "<config>") -> Path:
    """A release directory from a path (absolute, relative to `relative_to` or to the working directory) or a
    Hugging Face hub id already in the local hub cache (nothing is downloaded)."""
    expanded = Path(os.path.expandvars(os.path.expanduser(name)))
    for candidate in ([relative_to / expanded] if relative_to is not None and not expanded.is_absolute() else []) + [expanded]:
        if candidate.is_dir():
            return candidate.resolve()
    if HUB_ID.fullmatch(name):
        try:
            from huggingface_hub import snapshot_download
            return Path(snapshot_download(name, local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the cache (or no hub client): one actionable message below
            pass
        raise ReleaseNotFound(f"{source}: release {name!r} is neither a directory nor in the local Hugging Face "
                              f"cache; download it (`huggingface-cli download {name} --local-dir DIR`) and set "
                              f"release: DIR")
    raise ConfigError(f"{source}: release directory not found: {name}")


def is_release_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


def read_release_config(directory: Path) -> dict[str, Any]:
    file = directory / CONFIG_FILE
    if not file.is_file():
        raise ConfigError(f"{directory}: no {CONFIG_FILE}: not a release directory")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: the top level must be an object")
    return data


def architecture(data: dict[str, Any], file: Path) -> str:
    names = data.get("architectures")
    if not isinstance(names, list) or len(names) != 1:
        raise ConfigError(f"{file}: field `architectures` = {names!r}: expected one of {list(ARCHITECTURES)}")
    if names[0] not in ARCHITECTURES:
        raise ConfigError(f"{file}: field `architectures` = {names!r} is not supported; supported: "
                          f"{', '.join(ARCHITECTURES)}")
    return names[0]


# --------------------------------------------------------------------------------------------------
# Field by field

class Section:
    """The fields of one config.json section; every field must be taken, or the section is refused."""

    def __init__(self, values: Any, file: Path, name: str = "") -> None:
        if not isinstance(values, dict):
            raise ConfigError(f"{file}: field `{name}` must be an object, got {type(values).__name__}")
        self.values, self.file, self.name, self.left = values, file, name, dict(values)

    def key(self, field: str) -> str:
        return f"{self.name}.{field}" if self.name else field

    def error(self, field: str, message: str) -> ConfigError:
        return ConfigError(f"{self.file}: field `{self.key(field)}` {message}")

    def take(self, field: str, default: Any = None) -> Any:
        self.left.pop(field, None)
        return self.values.get(field, default)

    def take_known(self, fields: tuple[str, ...] | frozenset[str] | set[str]) -> dict[str, Any]:
        return {f: self.take(f) for f in list(self.values) if f in fields}  # in the file's order

    def drop(self, reasons: dict[str, str] | frozenset[str]) -> None:
        for field in reasons:
            self.left.pop(field, None)

    def finish(self, known: list[str] | tuple[str, ...] = ()) -> None:
        """Generic transformers fields are taken; anything else left is refused by name."""
        for field, reason in REFUSED_FIELDS.items():
            if field in self.left:
                raise self.error(field, f"is not supported: {reason}")
        changed = [f"{f}={self.left[f]!r}" for f in GENERATION_DEFAULTS
                   if f in self.left and self.left[f] != GENERATION_DEFAULTS[f]]
        if changed:
            warnings.warn(f"{self.file}: generation defaults {', '.join(changed)}"
                          f"{' in ' + self.name if self.name else ''} are not applied: pass them to generation "
                          f"(evaluation sets its own)", stacklevel=3)
        unknown = sorted(f for f in self.left if f not in GENERIC_FIELDS and f not in GENERATION_DEFAULTS)
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise self.error(unknown[0], f"is unknown{hint}: its meaning is not implemented, so the model cannot "
                                         f"be built as the release intends" + (f" (also unknown: {', '.join(unknown[1:])})"
                                                                                 if unknown[1:] else ""))


def _llm(values: Any, file: Path, name: str, family: str) -> dict[str, Any]:
    """An LLM section -> our backbone section (the config class validates the values)."""
    from models.backbones import config_fields
    from models.ling_lite import LingLiteConfig
    from models.ling_mini import LingMiniConfig
    config_class, backbone = (LingMiniConfig, "ling-mini-2.0") if family == LING_MINI else (LingLiteConfig, "ling-lite")
    section = Section(values, file, name)
    known = sorted(config_fields(config_class) - GENERIC_FIELDS)
    fields = section.take_known(set(known))
    section.drop(LLM_INERT)
    section.finish(known)
    vocab = fields.get("vocab_size", inspect.signature(config_class.__init__).parameters["vocab_size"].default)
    for token in ("pad_token_id", "eos_token_id", "image_patch_token"):
        if isinstance(fields.get(token), int) and not 0 <= fields[token] < vocab:
            raise section.error(token, f"= {fields[token]} is outside the vocabulary (vocab_size = {vocab})")
    try:
        config_class(**fields)  # refuses values we do not implement (e.g. rope_scaling.type='yarn')
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{file}: {name + ': ' if name else ''}{err}") from None
    return {"name": backbone, "config": fields}


def _vision(values: Any, file: Path, preprocessor: dict[str, Any], preprocessor_file: Path) -> dict[str, Any]:
    section = Section(values, file, "vision_config")
    config = section.take_known(VISION_FIELDS)
    for alias, field in VISION_ALIASES.items():
        if alias in section.values:
            value = section.take(alias)
            if field in config and value != config[field]:
                raise section.error(alias, f"= {value!r} disagrees with {field} = {config[field]!r}")
    section.drop(VISION_INERT)
    section.finish(VISION_FIELDS)
    # Dynamic resolution and normalisation come from preprocessor_config.json (the release's image processor).
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    for field in ("min_pixels", "max_pixels"):
        if field in preprocessor:
            config[field] = preprocessor[field]
    geometry = {"patch_size": "patch_size", "temporal_patch_size": "temporal_patch_size", "merge_size": "spatial_merge_size"}
    defaults = {"patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2}
    for field, ours in geometry.items():
        if field in preprocessor and preprocessor[field] != config.get(ours, defaults[ours]):
            raise ConfigError(f"{preprocessor_file}: field `{field}` = {preprocessor[field]!r} disagrees with "
                              f"{file.name} vision_config.{ours} = {config.get(ours, defaults[ours])!r}")
    for field, expected in (("image_mean", OPENAI_CLIP_MEAN), ("image_std", OPENAI_CLIP_STD)):
        if field in preprocessor and [round(float(v), 6) for v in preprocessor[field]] != [round(v, 6) for v in expected]:
            raise ConfigError(f"{preprocessor_file}: field `{field}` = {preprocessor[field]!r} is not the CLIP "
                              f"normalisation {expected} that the vision preprocessor implements")
    return {"name": "qwen2_5_vl", "config": config}


def _whisper(section: Section, file: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """`{whisper_encoder_config, ds_kernel_size, ds_stride}` (configuration_whisper_encoder.py WhisperEncoderConfig,
    whose defaults are ds_kernel_size=3, ds_stride=2) -> (audio encoder section, audio projector options)."""
    dims = Section(section.take("whisper_encoder_config"), file, section.key("whisper_encoder_config"))
    missing = [d for d in WHISPER_DIMS if d not in dims.values]
    if missing:
        raise dims.error(missing[0], "is missing: openai-whisper's AudioEncoder needs n_mels, n_ctx, n_state, "
                                     "n_head and n_layer")
    n = {d: dims.take(d) for d in WHISPER_DIMS}
    dims.finish(WHISPER_DIMS)
    # openai-whisper AudioEncoder: MLP width 4 * n_state (GELU), a positional table of n_ctx rows; Ming's
    # n_ctx=15000 lets a clip of up to 300 s be encoded at its own length (modeling_whisper_encoder.py)
    encoder = {"d_model": n["n_state"], "encoder_layers": n["n_layer"], "encoder_attention_heads": n["n_head"],
               "encoder_ffn_dim": 4 * n["n_state"], "num_mel_bins": n["n_mels"], "max_source_positions": n["n_ctx"]}
    projector = {"kernel_size": section.take("ds_kernel_size", 3), "stride": section.take("ds_stride", 2)}
    return {"name": "whisper", "config": encoder}, projector


def _ming(data: dict[str, Any], file: Path, directory: Path) -> dict[str, Any]:
    top = Section(data, file)
    top.take("architectures")
    if "llm_config" not in data:
        raise top.error("llm_config", "is missing: BailingMMConfig builds the LLM from it")
    out: dict[str, Any] = {"backbone": _llm(top.take("llm_config"), file, "llm_config", LING_LITE)}
    mlp_depth = top.take("mlp_depth", 1)  # BailingMMConfig default
    preprocessor_file = directory / PREPROCESSOR_FILE
    preprocessor = json.loads(preprocessor_file.read_text()) if preprocessor_file.is_file() else {}
    if top.values.get("vision_config") is not None:
        out["vision"] = _vision(top.take("vision_config"), file, preprocessor, preprocessor_file)
    else:
        top.take("vision_config")
    audio, projector, skipped = _audio_sections(top, file)
    if audio is not None:
        out["audio"] = audio
        n_mels = (preprocessor.get("whisper_frontend_args") or {}).get("n_mels")
        if n_mels is not None and n_mels != audio["config"]["num_mel_bins"]:
            raise ConfigError(f"{preprocessor_file}: field `whisper_frontend_args.n_mels` = {n_mels} disagrees with "
                              f"{file.name}'s whisper_encoder_config.n_mels = {audio['config']['num_mel_bins']}")
    # modeling_bailingmm.py: linear_proj = Linear + (GELU, Linear) x (mlp_depth - 1), image features always
    # L2-normalised (extract_image_feature); linear_proj_audio = Conv1d(ds_kernel_size, ds_stride) + the same
    # MLP, normalised when audio_config.norm_query_embeds (extract_audio_feature).
    out["projectors"] = {"vision": {"name": "mlp_gelu", "depth": mlp_depth, "normalize": True},
                         "audio": {"name": "conv_audio", "depth": mlp_depth, **projector}}
    if top.values.get("talker_config") is not None:
        warnings.warn(f"{file}: `talker_config` is present but the talker (speech output) is not built; its "
                      f"weights (`talker.*`, or the talker/ folder) are not loaded", stacklevel=3)
        skipped.append("talker")
    top.take("talker_config")
    top.finish(("llm_config", "vision_config", "audio_config", "whisper_config", "talker_config", "mlp_depth"))
    out["checkpoint_components"] = {name: "" for name in skipped}  # checkpoint component -> ours ("": not loaded)
    if audio is not None:
        out["checkpoint_components"].update(audio.pop("_prefixes"))
    return out


def _audio_sections(top: Section, file: Path) -> tuple[dict[str, Any] | None, dict[str, Any], list[str]]:
    """Ming's audio encoder. v1.5 (modeling_bailingmm.py at inclusionAI/Ming d97e2f3): `audio_config` is a
    WhisperEncoderConfig and the checkpoint's `audio.*` / `linear_proj_audio.*` are the Whisper encoder and
    its projector. v1: `audio_config` is the SANM encoder's GLMAudioConfig and `whisper_config` the Whisper
    encoder (`whisper_encoder.*`, `linear_proj_whisper.*`, used with `use_whisper_encoder=True`); only the
    Whisper path is built here, and the SANM weights are not loaded (a warning says so)."""
    audio_values, whisper_values = top.values.get("audio_config"), top.values.get("whisper_config")
    top.take("audio_config"), top.take("whisper_config")
    skipped: list[str] = []
    if isinstance(audio_values, dict) and "whisper_encoder_config" in audio_values:  # v1.5
        section = Section(audio_values, file, "audio_config")
        encoder, projector = _whisper(section, file)
        if "norm_query_embeds" not in section.values:
            raise section.error("norm_query_embeds", "is missing: modeling_bailingmm.py extract_audio_feature reads it")
        projector["normalize"] = bool(section.take("norm_query_embeds"))
        # GLMAudioConfig leftovers that the v1.5 code never reads (it builds WhisperEncoderConfig)
        section.drop(SANM_FIELDS)
        section.finish(("whisper_encoder_config", "ds_kernel_size", "ds_stride", "norm_query_embeds"))
        encoder["_prefixes"] = {}
        if whisper_values is not None:
            raise top.error("whisper_config", "is present next to audio_config.whisper_encoder_config: which "
                                              "Whisper encoder the checkpoint holds is ambiguous")
        return encoder, projector, skipped
    if whisper_values is not None:  # v1
        section = Section(whisper_values, file, "whisper_config")
        encoder, projector = _whisper(section, file)
        section.finish(("whisper_encoder_config", "ds_kernel_size", "ds_stride"))
        sanm = Section(audio_values or {}, file, "audio_config")
        projector["normalize"] = bool(sanm.take("norm_query_embeds", True))  # GLMAudioConfig default, applied to both
        sanm.drop(SANM_FIELDS | {"ds_kernel_size", "ds_stride", "model_type"})
        sanm.finish(tuple(SANM_FIELDS))
        if audio_values:
            warnings.warn(f"{file}: the SANM audio encoder of `audio_config` is not built (no SANM implementation "
                          f"here); audio goes through the Whisper encoder of `whisper_config`, as the official "
                          f"code with use_whisper_encoder=True; the `audio.*` / `linear_proj_audio.*` weights are "
                          f"not loaded", stacklevel=4)
            skipped += ["audio", "linear_proj_audio"]
        encoder["_prefixes"] = {"whisper_encoder": "audio", "linear_proj_whisper": "linear_proj_audio"}
        return encoder, projector, skipped
    if audio_values is not None:
        raise top.error("audio_config", "has no `whisper_encoder_config` and there is no `whisper_config`: "
                                        "only Whisper audio encoders are implemented")
    return None, {}, skipped


def release_model_config(directory: str | Path) -> dict[str, Any]:
    """config.json of a release directory -> the mapping of a model YAML (see models/build.py ModelConfig)."""
    directory = Path(directory).resolve()
    data = read_release_config(directory)
    file = directory / CONFIG_FILE
    family = architecture(data, file)
    files = {"config": str(file)}
    for name in TOKENIZER_FILES:
        if (directory / name).is_file():
            files[name.removesuffix(".json")] = str(directory / name)
    if family == MING:
        out = _ming(data, file, directory)
        out["checkpoint"] = str(directory)
        if (directory / PREPROCESSOR_FILE).is_file():
            files["preprocessor_config"] = str(directory / PREPROCESSOR_FILE)
            mvn = _cmvn_file(directory)
            if mvn is not None and mvn.is_file():
                files["am_mvn"] = str(mvn)
    else:
        out = {"backbone": _llm(data, file, "", family)}
        out["backbone"]["checkpoint"] = str(directory)
    if "tokenizer" in files:
        out["tokenizer"] = files["tokenizer"]
    out["release"] = str(directory)
    out["release_files"] = files
    return out


def _cmvn_file(directory: Path) -> Path | None:
    """The audio front end's CMVN statistics (`wav_frontend_args.cmvn_file` of preprocessor_config.json,
    relative to the release, as audio_processing_bailingmm.py resolves it)."""
    preprocessor = json.loads((directory / PREPROCESSOR_FILE).read_text())
    name = (preprocessor.get("wav_frontend_args") or {}).get("cmvn_file")
    return None if name is None else directory / name


# --------------------------------------------------------------------------------------------------
# Files a weight-loading build needs

def check_release_files(directory: str | Path) -> None:
    """Everything the release must hold before its weights are loaded; each missing piece names its file."""
    directory = Path(directory)
    data = read_release_config(directory)
    family = architecture(data, directory / CONFIG_FILE)
    index, single = directory / INDEX_FILE, directory / SINGLE_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConfigError(f"{index}: not a safetensors index ({type(err).__name__}: {err})") from None
        absent = sorted({name for name in weight_map.values() if not (directory / name).is_file()})
        if absent:
            raise ConfigError(f"{index} names shard(s) missing from {directory}: {', '.join(absent[:8])}")
    elif not single.is_file():
        shards = sorted(p.name for p in directory.iterdir() if SHARD.fullmatch(p.name))
        what = f"shards {', '.join(shards[:3])} but no {INDEX_FILE}" if shards else f"no {INDEX_FILE} or {SINGLE_FILE}"
        raise ConfigError(f"{directory}: {what}")
    for name in TOKENIZER_FILES:
        if not (directory / name).is_file():
            raise ConfigError(f"{directory}: no {name}: the release's tokenizer is needed to feed the model")
    if family == MING:
        if not (directory / PREPROCESSOR_FILE).is_file():
            raise ConfigError(f"{directory}: no {PREPROCESSOR_FILE}: the release's image and audio preprocessing "
                              f"settings (min_pixels, max_pixels, audio front end) come from it")
        mvn = _cmvn_file(directory)
        if mvn is not None and not mvn.is_file():
            raise ConfigError(f"{directory / PREPROCESSOR_FILE}: field `wav_frontend_args.cmvn_file` names "
                              f"{mvn.name}, which is missing from {directory}")


__all__ = ["release_model_config", "resolve_release", "is_release_dir", "check_release_files", "ARCHITECTURES"]
