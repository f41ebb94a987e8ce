"""Data: the dataset registry (CIFAR, ImageFolder, built-in synthetic sets), splits and batch pipelines."""

from alternas.data.datasets import DataConfig, DataSplits, ImageData, load_data
from alternas.data.loader import TensorLoader

__all__ = ["DataConfig", "DataSplits", "ImageData", "TensorLoader", "load_data"]
