"""Data loading for dcbench: datasets, transforms, fingerprints and the embedded digits.

Synthetic test fixtures live in :mod:`dcbench.data.synthetic` (import it explicitly).
"""
from dcbench.data.datasets import (
    IMAGE_EXTENSIONS,
    DataError,
    ImageDataset,
    FinishedBatches,
    InMemoryImageDataset,
    SkipCounter,
    UnreadableImageError,
    WaitedBatches,
    cache_decoded_images,
    decoded_in_memory,
    has_direct_images,
    image_folder,
    is_image_file,
    load_rgb,
    normalised_batches,
    open_training_data,
    read_file_list,
    skip_collate,
    subfolders,
    uint8_batches,
    unlabelled_images,
)
from dcbench.data.digits import digits_dataset, write_digits_imagefolder
from dcbench.data.fingerprint import dataset_fingerprint
from dcbench.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_transform,
    normalize,
    train_transform,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "DataError",
    "FinishedBatches",
    "ImageDataset",
    "InMemoryImageDataset",
    "SkipCounter",
    "UnreadableImageError",
    "WaitedBatches",
    "cache_decoded_images",
    "decoded_in_memory",
    "dataset_fingerprint",
    "digits_dataset",
    "eval_transform",
    "has_direct_images",
    "image_folder",
    "is_image_file",
    "load_rgb",
    "normalize",
    "normalised_batches",
    "open_training_data",
    "read_file_list",
    "skip_collate",
    "subfolders",
    "train_transform",
    "uint8_batches",
    "unlabelled_images",
    "write_digits_imagefolder",
]
