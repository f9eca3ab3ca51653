from .cache import DenseCache
from .mla import AttnContext, ForwardAux
from .model import GLM5, Impl

__all__ = ["GLM5", "Impl", "ForwardAux", "AttnContext", "DenseCache"]
