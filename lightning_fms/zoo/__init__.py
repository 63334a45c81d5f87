"""Small CPU-fast architectures, the digits demo task and other targets, the fine-tuning module and hub builders."""

from lightning_fms.zoo.build import (
    CNN_HUB_SPECS,
    DEFAULT_DEMO_EPOCHS,
    DEMO_HUB_SPECS,
    build_cnn_hub,
    build_demo_hub,
    build_hub,
    default_cache_dir,
    load_or_build_hub,
    quiet_lightning,
)
from lightning_fms.zoo.classifier import ImageClassifier
from lightning_fms.zoo.cnn import SmallCNN
from lightning_fms.zoo.deepsets import DeepSets
from lightning_fms.zoo.digits import DigitsDataModule, load_digits_task
from lightning_fms.zoo.mlp import MLP
from lightning_fms.zoo.mnist import MnistDataModule, load_mnist_task
from lightning_fms.zoo.mnist1d import Mnist1dDataModule, load_mnist1d_task
from lightning_fms.zoo.quality_hub import QUALITY_HUB_SPECS, build_quality_hub
from lightning_fms.zoo.resnet import BasicBlock, TinyResNet
from lightning_fms.zoo.vit import TinyViT

__all__ = [
    "CNN_HUB_SPECS",
    "DEFAULT_DEMO_EPOCHS",
    "DEMO_HUB_SPECS",
    "MLP",
    "BasicBlock",
    "DeepSets",
    "DigitsDataModule",
    "ImageClassifier",
    "Mnist1dDataModule",
    "MnistDataModule",
    "QUALITY_HUB_SPECS",
    "SmallCNN",
    "TinyResNet",
    "TinyViT",
    "build_cnn_hub",
    "build_demo_hub",
    "build_hub",
    "build_quality_hub",
    "default_cache_dir",
    "load_or_build_hub",
    "load_digits_task",
    "load_mnist1d_task",
    "load_mnist_task",
    "quiet_lightning",
]
