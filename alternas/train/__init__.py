"""Training: recipes, the loop (``fit``), metrics and checkpoints."""

from alternas.train.fit import RunResult, fit, pick_device
from alternas.train.recipe import PRESETS, Recipe, get_recipe

__all__ = ["PRESETS", "Recipe", "RunResult", "fit", "get_recipe", "pick_device"]
