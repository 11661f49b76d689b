"""Pure parameter-tree transforms (no trainer imports): model growth."""

from jaxcl.transforms.grow import depth_plan, duplication_counts, grow, grown_config

__all__ = ["grow", "grown_config", "duplication_counts", "depth_plan"]
