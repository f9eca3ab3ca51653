"""Training: pre-training with MTP and aux-loss-free MoE balancing, the two DSA stages, checkpoints, multi-process.

    from glm5.train import TrainConfig, train
    train(TrainConfig(model="tiny", steps=50, out_dir="runs/t"))
"""

from .data import Batch, JsonlDocs, Packer, SyntheticDocs
from .loop import TrainConfig, train

__all__ = ["TrainConfig", "train", "Packer", "Batch", "SyntheticDocs", "JsonlDocs"]
