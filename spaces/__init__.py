"""Search spaces: per-layer compression plans and how an Optuna trial picks one."""
from spaces.layers import LayerInfo, group_layers, linear_layers
from spaces.plan import LayerPlan, Plan, PlanError
from spaces.space import SPACES, Space, SpaceError, get_space

__all__ = ["SPACES", "LayerInfo", "LayerPlan", "Plan", "PlanError", "Space", "SpaceError", "get_space",
           "group_layers", "linear_layers"]
