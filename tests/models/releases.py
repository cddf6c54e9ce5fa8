"""Release directories as their authors publish them, written by the tests (never by our exporters).

`config.json` uses the official field names (the official configuration classes, and the fields that
transformers 4's `save_pretrained` adds to every release config.json); the weights are random tensors under
the official key names, with the official shapes, generated here from the official modeling code's module
structure, independently of models/checkpoint.py and models/ming_checkpoint.py:

- Ling (`BailingMoeForCausalLM`, inclusionAI/Ling models/modeling_bailing_moe.py; Ming's copy adds
  `mlp.image_gate` / `mlp.audio_gate` when `multi_gate`): `model.word_embeddings`, per layer
  `attention.query_key_value` / `attention.dense`, `input_layernorm`, `post_attention_layernorm`, an MoE
  `mlp.gate` + `mlp.experts.{e}.{gate,up,down}_proj` + `mlp.shared_experts.*` (or a dense `mlp.*_proj`),
  `model.norm`, `lm_head`;
- Ling 2.0 (`BailingMoeV2ForCausalLM`, inclusionAI/Ling-V2 models/modeling_bailing_moe_v2.py): also
  `attention.query_layernorm` / `key_layernorm`, `mlp.gate.expert_bias`, and MTP layers
  `model.layers.{num_hidden_layers + k}` (`enorm`, `hnorm`, `eh_proj`, ..., `final_layernorm`);
- Ming-Lite-Omni v1.5 (`BailingMMNativeForConditionalGeneration`, modeling_bailingmm.py at inclusionAI/Ming
  d97e2f3): `vision.*` (qwen2_5_vit.py Qwen2_5_VisionTransformer), `audio.*` (openai-whisper AudioEncoder:
  `conv1`, `conv2`, `positional_embedding` [n_ctx, n_state], `blocks.{i}.attn.{query,key,value,out}`,
  `attn_ln`, `mlp.0`, `mlp.2`, `mlp_ln`, `ln_post`), `linear_proj.{0,2}`, `linear_proj_audio.{0,3}`, `model.*`;
  v1 keeps its Whisper encoder as `whisper_encoder.*` + `linear_proj_whisper.*` next to a SANM `audio.*`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

# transformers 4.45 `PretrainedConfig.to_dict()` fields, as found in the Ming release config.json
TRANSFORMERS4 = {
    "add_cross_attention": False, "bad_words_ids": None, "begin_suppress_tokens": None, "bos_token_id": None,
    "chunk_size_feed_forward": 0, "cross_attention_hidden_size": None, "decoder_start_token_id": None,
    "diversity_penalty": 0.0, "do_sample": False, "early_stopping": False, "encoder_no_repeat_ngram_size": 0,
    "exponential_decay_length_penalty": None, "finetuning_task": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "is_decoder": False,
    "is_encoder_decoder": False, "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "length_penalty": 1.0,
    "max_length": 20, "min_length": 0, "no_repeat_ngram_size": 0, "num_beam_groups": 1, "num_beams": 1,
    "num_return_sequences": 1, "output_attentions": False, "output_hidden_states": False, "output_scores": False,
    "prefix": None, "problem_type": None, "pruned_heads": {}, "remove_invalid_values": False,
    "repetition_penalty": 1.0, "return_dict": True, "return_dict_in_generate": False, "sep_token_id": None,
    "suppress_tokens": None, "task_specific_params": None, "temperature": 1.0, "tf_legacy_loss": False,
    "tie_encoder_decoder": False, "tokenizer_class": None, "top_k": 50, "top_p": 1.0, "torchscript": False,
    "typical_p": 1.0, "use_bfloat16": False,
}
SPECIAL_TOKENS = ["<|endoftext|>", "<role>", "</role>", "<image>", "<imagePatch>", "</image>", "<video>", "</video>",
                  "<audio>", "<audioPatch>", "</audio>"]  # the Ming release has no <videoPatch>, <unk> or <pad>


# --------------------------------------------------------------------------------------------------
# config.json

def ling_lite_config(tiny: bool = True, **changes) -> dict:
    """A Ling-lite config.json: `BailingMoeConfig` fields (full size: the model card's 16.8B / 2.75B model)."""
    shape = (dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                  moe_intermediate_size=32, num_shared_experts=2, first_k_dense_replace=1, pad_token_id=0,
                  eos_token_id=0)
             if tiny else
             dict(vocab_size=126464, hidden_size=2048, intermediate_size=5632, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=4, head_dim=128, num_experts=64, num_experts_per_tok=6,
                  moe_intermediate_size=1408, num_shared_experts=2, first_k_dense_replace=0))
    config = {"architectures": ["BailingMoeForCausalLM"],
              "auto_map": {"AutoConfig": "configuration_bailing_moe.BailingMoeConfig",
                           "AutoModelForCausalLM": "modeling_bailing_moe.BailingMoeForCausalLM"},
              "model_type": "bailing_moe", "torch_dtype": "bfloat16", "transformers_version": "4.36.0",
              "hidden_act": "silu", "use_qkv_bias": False, "use_bias": False, "rms_norm_eps": 1e-6,
              "norm_head": True, "tie_word_embeddings": False, "embedding_dropout": 0.0, "attention_dropout": 0.0,
              "output_dropout": 0.0, "initializer_range": 0.006, "max_position_embeddings": 16384,
              "rope_theta": 600000, "use_cache": True, "use_sliding_window": False, "sliding_window": 4096,
              "max_window_layers": 28, "rope_scaling": None, "pad_token_id": 126081, "eos_token_id": 126081,
              "norm_topk_prob": True, "output_router_logits": False}
    config.update(shape)
    config.update(changes)
    return config


def ling_mini_config(tiny: bool = True, **changes) -> dict:
    """A Ling-mini-2.0 config.json: `BailingMoeV2Config` fields plus those its release adds
    (`partial_rotary_factor`, `score_function`, `norm_topk_prob`, `router_dtype`,
    `moe_shared_expert_intermediate_size`); full size: 16.26B total / 1.43B active."""
    shape = (dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, num_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                  moe_intermediate_size=32, moe_shared_expert_intermediate_size=32, num_shared_experts=1,
                  first_k_dense_replace=1, pad_token_id=0, eos_token_id=0)
             if tiny else
             dict(vocab_size=157184, hidden_size=2048, intermediate_size=5120, num_hidden_layers=20,
                  num_attention_heads=16, num_key_value_heads=4, head_dim=128, num_experts=256, num_experts_per_tok=8,
                  n_group=8, topk_group=4, moe_intermediate_size=512, moe_shared_expert_intermediate_size=512,
                  num_shared_experts=1, first_k_dense_replace=1))
    config = {"architectures": ["BailingMoeV2ForCausalLM"],
              "auto_map": {"AutoConfig": "configuration_bailing_moe_v2.BailingMoeV2Config",
                           "AutoModelForCausalLM": "modeling_bailing_moe_v2.BailingMoeV2ForCausalLM"},
              "model_type": "bailing_moe", "torch_dtype": "bfloat16", "transformers_version": "4.52.3",
              "hidden_act": "silu", "use_qkv_bias": False, "use_bias": False, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": False, "embedding_dropout": 0.0, "attention_dropout": 0.0, "output_dropout": 0.0,
              "initializer_range": 0.02, "max_position_embeddings": 32768, "rope_theta": 600000, "use_cache": True,
              "max_window_layers": 20, "rope_scaling": None, "pad_token_id": 156892, "eos_token_id": 156892,
              "use_qk_norm": True, "num_nextn_predict_layers": 1, "mtp_loss_scaling_factor": 0,
              "moe_router_enable_expert_bias": True, "routed_scaling_factor": 2.5, "partial_rotary_factor": 0.5,
              "score_function": "sigmoid", "norm_topk_prob": True, "router_dtype": "fp32", "output_router_logits": False}
    config.update(shape)
    config.update(changes)
    return config


def ming_config(version: str = "1.5", tiny: bool = True, **changes) -> dict:
    """A Ming-Lite-Omni config.json (`BailingMMConfig`): `llm_config` (Ming's BailingMoeConfig, multi_gate),
    `vision_config` (Qwen2_5_VLVisionConfig), and the audio encoder: v1.5 `audio_config` = WhisperEncoderConfig
    (what modeling_bailingmm.py at d97e2f3 reads: `audio_config.whisper_encoder_config`, `ds_kernel_size`,
    `ds_stride`, `norm_query_embeds`); v1 `audio_config` = the SANM encoder's GLMAudioConfig + `whisper_config`."""
    llm = {**TRANSFORMERS4, **ling_lite_config(tiny), "multi_gate": True, "norm_head": False, "norm_softmax": False,
           "image_patch_token": 4 if tiny else 126346, "pretraining_tp": 1,  # tiny: ids of SPECIAL_TOKENS
           "pad_token_id": 0 if tiny else 126081, "eos_token_id": 0 if tiny else 126081}
    if version == "1.5":
        llm.update(rms_norm_eps=1e-5, rope_scaling={"type": "3D", "factor": None},
                   image_start_token=3 if tiny else 126347, video_start_token=6 if tiny else 126349)
    else:
        llm.update(rms_norm_eps=1e-6, rope_scaling=None)
    for key in ("architectures", "auto_map"):
        llm[key] = {"architectures": ["BailingMoeForCausalLM"],
                    "auto_map": {"AutoConfig": "configuration_bailing_moe.BailingMoeConfig"}}[key]
    vision = ({**TRANSFORMERS4, "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
               "out_hidden_size": 48, "fullatt_block_indexes": [1]} if tiny else
              {**TRANSFORMERS4, "depth": 32, "hidden_size": 1280, "intermediate_size": 3456, "num_heads": 16,
               "out_hidden_size": 8192, "fullatt_block_indexes": [7, 15, 23, 31]})
    vision.update({"architectures": ["Qwen2_5_VisionTransformer"], "model_type": "qwen2_5_vit", "hidden_act": "silu",
                   "in_channels": 3, "in_chans": 3, "patch_size": 14, "spatial_patch_size": 14,
                   "spatial_merge_size": 2, "temporal_patch_size": 2, "tokens_per_second": 2, "window_size": 112,
                   "tie_word_embeddings": True, "torch_dtype": "bfloat16"})
    whisper = ({"n_ctx": 15000, "n_head": 2, "n_layer": 2, "n_mels": 128, "n_state": 32} if tiny else
               {"n_ctx": 15000, "n_head": 20, "n_layer": 32, "n_mels": 128, "n_state": 1280})
    config = {"architectures": ["BailingMMNativeForConditionalGeneration"],
              "auto_map": {"AutoConfig": "configuration_bailingmm.BailingMMConfig"}, "model_type": "bailingmm",
              "mlp_depth": 2, "llm_config": llm, "vision_config": vision, "talker_config": None,
              "torch_dtype": "float32", "transformers_version": "4.45.0"}
    if version == "1.5":
        config["audio_config"] = {"whisper_encoder_config": whisper, "ds_kernel_size": 3, "ds_stride": 2,
                                  "norm_query_embeds": True}
    else:
        config["audio_config"] = {"audio_encoder_output_size": 512, "audio_decoder_type": None, "audio_id_shift": None,
                                  "ds_conv_type": "conv", "ds_kernel_size": 1, "ds_stride": 1,
                                  "model_type": "bailingmm", "norm_query_embeds": True, "use_audio_bpe_token": False,
                                  "vocab_size_audio": 0, "audio_wav_frontend_config_sanm": {},
                                  "audio_encoder_config_sanm": {"output_size": 512}}
        config["whisper_config"] = {"ds_kernel_size": 3, "ds_stride": 2, "whisper_encoder_config": whisper}
    config.update(changes)
    return config


PREPROCESSOR = {  # Ming-Lite-Omni's preprocessor_config.json (inclusionAI/Ming d97e2f3)
    "auto_map": {"AutoProcessor": "processing_bailingmm.BailingMMProcessor"},
    "min_pixels": 78400, "max_pixels": 802816, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_token": "<image>", "video_token": "<video>", "audio_token": "<audio>",
    "image_processor_type": "BailingMMImageProcessor", "audio_processor_type": "BailingMMAudioProcessor",
    "chunk_length": 30, "dither": 0.0, "feature_size": 80, "frame_length": 25, "frame_shift": 10,
    "inverse_norm": True, "lfr_m": 7, "lfr_n": 6, "n_samples": 480000, "num_audio_tokens": 256,
    "sampling_rate": 16000, "up_sample": True, "return_attention_mask": True, "padding_side": "right",
    "padding_value": 0.0, "processor_class": "BailingMMProcessor",
    "wav_frontend_args": {"cmvn_file": "am.mvn", "fs": 16000, "window": "hamming", "n_mels": 80,
                          "frame_length": 25, "frame_shift": 10, "lfr_m": 7, "lfr_n": 6},
    "whisper_frontend_args": {"n_mels": 128},
}


# --------------------------------------------------------------------------------------------------
# official key names and shapes

def ling_keys(c: dict, prefix: str = "", v2: bool = False) -> dict[str, tuple[int, ...]]:
    H, hd, nh = c["hidden_size"], c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"], c["num_attention_heads"]
    nkv = c.get("num_key_value_heads") or nh
    E, inter, shared = c["num_experts"], c["moe_intermediate_size"], c["num_shared_experts"]
    keys = {f"{prefix}model.word_embeddings.weight": (c["vocab_size"], H)}

    def attention(p: str) -> None:
        keys[f"{p}attention.query_key_value.weight"] = ((nh + 2 * nkv) * hd, H)
        keys[f"{p}attention.dense.weight"] = (H, nh * hd)
        if v2 and c.get("use_qk_norm", True):
            keys[f"{p}attention.query_layernorm.weight"] = (hd,)
            keys[f"{p}attention.key_layernorm.weight"] = (hd,)

    def moe(p: str) -> None:
        gates = ["gate"] + (["image_gate", "audio_gate"] if c.get("multi_gate") else [])
        for gate in gates:
            keys[f"{p}mlp.{gate}.weight"] = (E, H)
        if v2:
            keys[f"{p}mlp.gate.expert_bias"] = (E,)
        for e in range(E):
            keys[f"{p}mlp.experts.{e}.gate_proj.weight"] = (inter, H)
            keys[f"{p}mlp.experts.{e}.up_proj.weight"] = (inter, H)
            keys[f"{p}mlp.experts.{e}.down_proj.weight"] = (H, inter)
        for proj, shape in (("gate_proj", (inter * shared, H)), ("up_proj", (inter * shared, H)),
                            ("down_proj", (H, inter * shared))):
            keys[f"{p}mlp.shared_experts.{proj}.weight"] = shape

    for i in range(c["num_hidden_layers"]):
        p = f"{prefix}model.layers.{i}."
        keys[f"{p}input_layernorm.weight"] = (H,)
        keys[f"{p}post_attention_layernorm.weight"] = (H,)
        attention(p)
        if i >= c["first_k_dense_replace"]:
            moe(p)
        else:
            I = c["intermediate_size"]
            keys.update({f"{p}mlp.gate_proj.weight": (I, H), f"{p}mlp.up_proj.weight": (I, H),
                         f"{p}mlp.down_proj.weight": (H, I)})
    for k in range(c.get("num_nextn_predict_layers", 0) if v2 else 0):
        p = f"{prefix}model.layers.{c['num_hidden_layers'] + k}."
        for norm in ("input_layernorm", "post_attention_layernorm", "enorm", "hnorm", "final_layernorm"):
            keys[f"{p}{norm}.weight"] = (H,)
        keys[f"{p}eh_proj.weight"] = (H, 2 * H)
        attention(p)
        moe(p)
    keys[f"{prefix}model.norm.weight"] = (H,)
    keys[f"{prefix}lm_head.weight"] = (c["vocab_size"], H)
    return keys


def vision_keys(v: dict, prefix: str = "vision.") -> dict[str, tuple[int, ...]]:
    C, I = v["hidden_size"], v["intermediate_size"]
    keys = {f"{prefix}patch_embed.proj.weight": (C, v["in_channels"], v["temporal_patch_size"], v["patch_size"],
                                                 v["patch_size"])}
    for i in range(v["depth"]):
        p = f"{prefix}blocks.{i}."
        keys.update({f"{p}norm1.weight": (C,), f"{p}norm2.weight": (C,),
                     f"{p}attn.qkv.weight": (3 * C, C), f"{p}attn.qkv.bias": (3 * C,),
                     f"{p}attn.proj.weight": (C, C), f"{p}attn.proj.bias": (C,)})
        for proj, shape in (("gate_proj", (I, C)), ("up_proj", (I, C)), ("down_proj", (C, I))):
            keys[f"{p}mlp.{proj}.weight"], keys[f"{p}mlp.{proj}.bias"] = shape, (shape[0],)
    merged = C * v["spatial_merge_size"] ** 2
    keys.update({f"{prefix}merger.ln_q.weight": (C,), f"{prefix}merger.mlp.0.weight": (merged, merged),
                 f"{prefix}merger.mlp.0.bias": (merged,), f"{prefix}merger.mlp.2.weight": (v["out_hidden_size"], merged),
                 f"{prefix}merger.mlp.2.bias": (v["out_hidden_size"],)})
    return keys


def whisper_keys(w: dict, prefix: str = "audio.") -> dict[str, tuple[int, ...]]:
    n, mels = w["n_state"], w["n_mels"]
    keys = {f"{prefix}conv1.weight": (n, mels, 3), f"{prefix}conv1.bias": (n,), f"{prefix}conv2.weight": (n, n, 3),
            f"{prefix}conv2.bias": (n,), f"{prefix}positional_embedding": (w["n_ctx"], n)}
    for i in range(w["n_layer"]):
        p = f"{prefix}blocks.{i}."
        for proj in ("query", "key", "value", "out"):
            keys[f"{p}attn.{proj}.weight"] = (n, n)
            if proj != "key":  # openai-whisper: Linear(n_state, n_state, bias=False) for the key
                keys[f"{p}attn.{proj}.bias"] = (n,)
        for ln in ("attn_ln", "mlp_ln"):
            keys[f"{p}{ln}.weight"], keys[f"{p}{ln}.bias"] = (n,), (n,)
        keys.update({f"{p}mlp.0.weight": (4 * n, n), f"{p}mlp.0.bias": (4 * n,), f"{p}mlp.2.weight": (n, 4 * n),
                     f"{p}mlp.2.bias": (n,)})
    keys[f"{prefix}ln_post.weight"], keys[f"{prefix}ln_post.bias"] = (n,), (n,)
    return keys


def release_keys(config: dict) -> dict[str, tuple[int, ...]]:
    """Every key of the release checkpoint config.json describes, with its shape."""
    arch = config["architectures"][0]
    if arch == "BailingMoeForCausalLM":
        return ling_keys(config)
    if arch == "BailingMoeV2ForCausalLM":
        return ling_keys(config, v2=True)
    llm, H, depth = config["llm_config"], config["llm_config"]["hidden_size"], config["mlp_depth"]
    keys = {**vision_keys(config["vision_config"]), **ling_keys(llm, prefix="model.")}
    keys["linear_proj.0.weight"], keys["linear_proj.0.bias"] = (H, config["vision_config"]["out_hidden_size"]), (H,)
    for k in range(1, depth):
        keys[f"linear_proj.{2 * k}.weight"], keys[f"linear_proj.{2 * k}.bias"] = (H, H), (H,)
    audio = config["audio_config"]
    if "whisper_encoder_config" in audio:  # v1.5
        whisper, ds, names = audio["whisper_encoder_config"], audio, ("audio.", "linear_proj_audio.")
    else:  # v1: the SANM encoder's weights are left out of these tiny releases; its Whisper path is kept
        whisper, ds, names = config["whisper_config"]["whisper_encoder_config"], config["whisper_config"], \
            ("whisper_encoder.", "linear_proj_whisper.")
    keys.update(whisper_keys(whisper, names[0]))
    keys[f"{names[1]}0.weight"] = (H, whisper["n_state"], ds["ds_kernel_size"])
    keys[f"{names[1]}0.bias"] = (H,)
    for k in range(1, depth):  # Conv1d, Transpose, then (GELU, Linear) pairs: Linear at 3, 5, ...
        keys[f"{names[1]}{2 * k + 1}.weight"], keys[f"{names[1]}{2 * k + 1}.bias"] = (H, H), (H,)
    return keys


# --------------------------------------------------------------------------------------------------
# writing a release directory

def tokenizer_files(directory: Path, vocab_size: int) -> None:
    words = SPECIAL_TOKENS + [f"w{i}" for i in range(min(vocab_size, 64) - len(SPECIAL_TOKENS))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "additional_special_tokens": ["<role>", "</role>"],
         "tokenizer_class": "BailingTokenizer"}))


def write_release(directory: str | Path, config: dict, weights: bool = True, seed: int = 0,
                  tensors: dict[str, torch.Tensor] | None = None, shards: int = 2) -> Path:
    """A release directory: config.json, `shards` safetensors shards + index (random weights under the official
    names; `tensors` overrides some), tokenizer.json + tokenizer_config.json, and for Ming
    preprocessor_config.json + am.mvn."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    vocab = config.get("vocab_size") or config["llm_config"]["vocab_size"]
    tokenizer_files(directory, vocab)
    if "llm_config" in config:
        (directory / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
        (directory / "am.mvn").write_text("<Nnet>\n<AddShift> 560 560\n<LearnRateCoef> 0 [ 0 ]\n</Nnet>\n")
    if not weights:
        return directory
    generator = torch.Generator().manual_seed(seed)
    values = {key: (torch.randn(shape, generator=generator) * 0.2) for key, shape in release_keys(config).items()}
    for key in values:
        if key.endswith(("layernorm.weight", "norm.weight", "norm1.weight", "norm2.weight", "ln_q.weight", "_ln.weight",
                         "ln_post.weight", "enorm.weight", "hnorm.weight")):
            values[key] = 1 + 0.1 * values[key]
    values.update(tensors or {})
    names = list(values)
    per_shard = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        part = names[s * per_shard:(s + 1) * per_shard]
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: values[k].contiguous() for k in part}, directory / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    total = sum(t.numel() * t.element_size() for t in values.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return directory
