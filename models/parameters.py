"""Parameter counts: total, and *active* (what one token uses: top-K of the routed experts)."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from models.routing import moe_routers


@dataclass
class ParameterCount:
    total: int
    active: int
    components: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (total, active)


def count_parameters(model: nn.Module, component_depth: int = 1, include_mtp: bool = False) -> ParameterCount:
    """Count every parameter once (tied weights once); routed experts count K/n towards `active`.

    The model cards' convention: embeddings and the LM head are included in both numbers, the
    multi-token-prediction layers are not (Ling-mini-2.0: 16.26B total, 1.43B active); a
    `multi_gate` router's modality routers count once towards `active` (each token uses one).
    """
    inactive_by_name: dict[str, float] = {}
    for name, gate in moe_routers(model):
        block_name = name.rsplit(".", 1)[0] if "." in name else ""
        block = model.get_submodule(block_name) if block_name else model
        share = 1 - gate.top_k / gate.num_experts
        for param_name, _ in block.experts.named_parameters():
            inactive_by_name[f"{block_name}.experts.{param_name}".lstrip(".")] = share
    for name, module in model.named_modules():
        if hasattr(module, "image_weight") and hasattr(module, "audio_weight"):  # multi_gate router
            inactive_by_name[f"{name}.image_weight"] = inactive_by_name[f"{name}.audio_weight"] = 1.0
    mtp = tuple(f"{name}." for name, module in model.named_modules() if getattr(module, "is_mtp_layer", False))
    total = active = 0.0
    components: dict[str, list[float]] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen or (mtp and not include_mtp and name.startswith(mtp)):
            continue
        seen.add(id(param))
        n = param.numel()
        a = n * (1 - inactive_by_name.get(name, 0.0))
        total, active = total + n, active + a
        key = ".".join(name.split(".")[:component_depth])
        bucket = components.setdefault(key, [0, 0])
        bucket[0] += n
        bucket[1] += a
    return ParameterCount(int(total), int(round(active)),
                          {k: (int(t), int(round(a))) for k, (t, a) in components.items()})
