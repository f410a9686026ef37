"""Small real models and data that ship with packages (no downloads): used by tests, examples, benchmarks."""

from .digits import DigitsData, DigitsNet, accuracy, load_digits_data, train
from .mnist import MnistResNet, load_mnist_data
from .photos import CROPS, IMAGENET_MEAN, IMAGENET_STD, crops, extra_photos, image_tensors, load_efficientnet_lite0, photos, random_crops, split_photos, views_of
from .views import MIXES, MixedViews

__all__ = ["DigitsData", "DigitsNet", "accuracy", "load_digits_data", "train", "MnistResNet", "load_mnist_data",
           "CROPS", "IMAGENET_MEAN", "IMAGENET_STD", "crops", "extra_photos", "load_efficientnet_lite0", "photos",
           "random_crops", "split_photos", "image_tensors", "views_of", "MIXES", "MixedViews"]
