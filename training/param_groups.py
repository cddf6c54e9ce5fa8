"""AdamW parameter groups: per-group learning rates by parameter-name pattern, and the weight-decay split.

`optim.lr_groups: [{pattern: "linear_proj*", lr: 1e-4}, {pattern: "vision.*", lr: 2e-6}]` gives the
parameters whose full name matches a pattern that learning rate; the first matching pattern wins, so
list the narrow patterns first. Patterns are shell-style (`fnmatch.fnmatchcase`: `*` also crosses
dots, no regex escaping of the dots in module paths). The other trainable parameters form the `default`
group at `optim.lr`, which comes first so that the optimizer's first group (the logged `lr`) is
`optim.lr`'s schedule. The schedule (`LambdaLR`) multiplies every group's own lr by the same factor.

Inside each named group, biases, norm weights and other 1-D parameters get no weight decay (common LLM
practice). Each returned group carries its `name`, so the log can show `lr_<name>`.
"""
from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

from torch import nn

from models.config import ConfigError
from training.config import LrGroup, OptimConfig

DEFAULT_GROUP = "default"


def group_of(name: str, lr_groups: list[LrGroup]) -> int | None:
    """The index of the first pattern matching parameter `name`; None: the default group."""
    return next((i for i, group in enumerate(lr_groups) if fnmatchcase(name, group.pattern)), None)


def unmatched_pattern_message(lr_groups: list[LrGroup], trainable: Iterable[str], every: Iterable[str]) -> str | None:
    """What is wrong with the first pattern that takes no trainable parameter (first match wins), or None.

    `trainable`: the names of the parameters the optimizer sees; `every`: all parameter names (to say
    whether the pattern met only frozen parameters, and to list the top-level modules)."""
    trainable, every = list(trainable), list(every)
    taken = {group_of(name, lr_groups) for name in trainable}
    for i, group in enumerate(lr_groups):
        if i in taken:
            continue
        if any(fnmatchcase(name, group.pattern) for name in trainable):
            earlier = [g.pattern for g in lr_groups[:i]]
            why = f"an earlier pattern takes every parameter it matches (first match wins: {earlier})"
        elif any(fnmatchcase(name, group.pattern) for name in every):
            why = "it matches only frozen parameters (see `freeze:`)"
        else:
            why = "it matches no parameter name"
        roots = sorted({name.split(".")[0] for name in every})
        return (f"optim.lr_groups[{i}].pattern = {group.pattern!r}: {why}; patterns are fnmatch patterns on full "
                f"parameter names (e.g. 'linear_proj.*'); top-level modules: {roots}")
    return None


def parameter_groups(model: nn.Module, optim: OptimConfig) -> list[dict]:
    """AdamW groups of `model`'s trainable parameters: one per lr group (default first) and decay setting.

    Raises `ConfigError` when a pattern takes no trainable parameter (a typo would otherwise train that
    part at the default lr without a word)."""
    named = list(model.named_parameters())
    trainable = [(name, param) for name, param in named if param.requires_grad]
    problem = unmatched_pattern_message(optim.lr_groups, [name for name, _ in trainable], [name for name, _ in named])
    if problem:
        raise ConfigError(problem)
    names = [DEFAULT_GROUP] + [group.name for group in optim.lr_groups]
    lrs = [optim.lr] + [group.lr for group in optim.lr_groups]
    buckets: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for name, param in trainable:
        index = group_of(name, optim.lr_groups)
        # under zero.Init a parameter is an empty 1-D placeholder; ds_shape is its real shape
        decays = len(getattr(param, "ds_shape", param.shape)) >= 2 and "norm" not in name
        buckets.setdefault((0 if index is None else index + 1, decays), []).append(param)
    return [{"params": buckets[key], "lr": lrs[key[0]], "name": names[key[0]],
             "weight_decay": optim.weight_decay if key[1] else 0.0}
            for key in sorted(buckets, key=lambda k: (k[0], not k[1]))]


def group_lrs(param_groups: list[dict]) -> dict[str, float]:
    """`{"lr_<name>": current lr}` of each named group (its decay and no-decay halves share one lr)."""
    return {f"lr_{group.get('name', DEFAULT_GROUP)}": group["lr"] for group in param_groups}
