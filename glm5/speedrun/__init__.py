"""`glm5 speedrun`: the recipe that trains the shipped default model on 2 CPU cores (see pipeline.py)."""

from .pipeline import STAGES, run_speedrun
from .recipe import RECIPES, Recipe

__all__ = ["run_speedrun", "RECIPES", "Recipe", "STAGES"]
