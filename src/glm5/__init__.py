"""glm5: the GLM-5 system in PyTorch."""

from .config import ModelConfig
from .loader import Loaded, build_model, load, load_model
from .model import GLM5, DenseCache, ForwardAux, Impl
from .weights import CheckpointError, save_checkpoint

__all__ = ["GLM5", "ModelConfig", "load_model", "load", "Loaded", "build_model", "save_checkpoint", "CheckpointError",
           "Impl", "ForwardAux", "DenseCache"]
__version__ = "0.1.0"
