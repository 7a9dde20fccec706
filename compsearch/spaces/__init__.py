"""Search spaces: per-layer compression plans and how an Optuna trial picks one."""
from compsearch.spaces.layers import LayerInfo, group_layers, linear_layers
from compsearch.spaces.plan import LayerPlan, Plan, PlanError
from compsearch.spaces.space import SPACE_KEYWORDS, Space, SpaceError, get_space

__all__ = ["SPACE_KEYWORDS", "LayerInfo", "LayerPlan", "Plan", "PlanError", "Space", "SpaceError", "get_space",
           "group_layers", "linear_layers"]
