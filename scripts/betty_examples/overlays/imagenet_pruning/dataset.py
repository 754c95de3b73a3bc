"""Stands in for imagenet_pruning/dataset.py (an HDF5 file of ImageNet JPEGs, read with h5py): the same
``ImageNet`` and ``get_subset_data``, holding seeded random images of the transforms' output shape
(3 x crop x crop, normalised floats) and balanced labels. BETTY_EXAMPLES_TRAIN / _TEST samples."""

import os

import numpy as np
import torch
from torch.utils.data import Dataset


class ImageNet(Dataset):
    def __init__(self, dataset_file: str, sample_set: str, classes: list, transform_type: str, args):
        self.classes = classes
        size = args.train_crop_size if transform_type == "train" else args.val_crop_size
        count = int(os.environ.get("BETTY_EXAMPLES_" + ("TRAIN" if sample_set == "train" else "TEST"), "200"))
        rng = np.random.default_rng(0 if sample_set == "train" else 1)
        self.images = torch.from_numpy(rng.standard_normal((count, 3, size, size), dtype=np.float32))
        self.labels = rng.permutation(np.arange(count) % len(classes)).tolist()

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def __len__(self):
        return len(self.labels)


def get_subset_data(dataset: Dataset, prune_strategy: str, instance_weights_dir: str, frac_data_kept: float):
    return torch.utils.data.Subset(dataset=dataset, indices=list(range(int(len(dataset) * frac_data_kept))))
