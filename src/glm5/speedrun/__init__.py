"""`glm5 speedrun`: the recipe that trains the shipped default model on 2 CPU cores (see pipeline.py)."""

from .pipeline import STAGES, run_speedrun, ship
from .recipe import RECIPES, Recipe

__all__ = ["run_speedrun", "ship", "RECIPES", "Recipe", "STAGES"]
