"""Models: registry, configs, MoE routing and tiers, backbones, projectors and the omni model.

Importing the package registers every built-in component (timm style), so config files can name them.
"""
from models import ling_lite, ling_mini, native  # noqa: F401  (register backbones)
from models import encoders, projectors  # noqa: F401  (register encoders and projectors)
