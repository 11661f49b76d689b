"""Pure parameter-tree transforms (no trainer imports): model growth and prompt insertion."""

from jaxcl.transforms.grow import depth_plan, duplication_counts, grow, grow_importance, grown_config
from jaxcl.transforms.prompts import add_prompts

__all__ = ["grow", "grow_importance", "grown_config", "duplication_counts", "depth_plan", "add_prompts"]
