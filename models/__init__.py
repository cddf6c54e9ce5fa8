"""Models: registry, configs, MoE routing and tiers, backbones, projectors and the omni model.

Importing the package registers every built-in component (timm style), so config files can name them.
"""
from models import ling_lite, ling_mini  # noqa: F401  (register backbones)
