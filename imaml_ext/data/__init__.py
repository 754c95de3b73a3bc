"""Few-shot data: Omniglot as device-resident tensors, a batched task sampler, and
learn2learn tasksets over the same arrays; Mini-ImageNet from learn2learn's cache files
(:func:`mini_imagenet_tasks`, read with a restricted unpickler, never downloaded).

Omniglot is read from the .npz arrays, the official folders or zips, or downloaded
(``load_omniglot(download=True)``, :func:`download_omniglot`).

Typical use::

    from imaml_ext.data import omniglot_tasks
    tasks = omniglot_tasks(ways=5, shots=1, query=15, device="cuda", seed=0)
    support_x, support_y, query_x, query_y = tasks.train.sample(32)   # 32 tasks at once
"""

from .cache import CacheError
from .download import OFFICIAL_MD5, OFFICIAL_URL, DownloadError, download_omniglot, option_spelling
from .l2l import ClassRotation, OmniglotDataset, from_l2l_taskset, l2l_tasksets, split_task
from .mini_imagenet import (
    MiniImagenetSampler,
    MiniImagenetSplit,
    MiniImagenetTasks,
    find_mini_imagenet,
    load_mini_imagenet,
    mini_imagenet_tasks,
    read_mini_imagenet,
)
from .omniglot import (
    NUM_CLASSES,
    NUM_DRAWERS,
    PIXEL_SHA256,
    PROTOCOLS,
    SPLITS,
    OmniglotTasks,
    default_cache_dir,
    default_download_dir,
    default_search_paths,
    find_data_root,
    load_omniglot,
    omniglot_tasks,
    split_classes,
)
from .sampler import TaskBatch, TaskIndices, TaskSampler

__all__ = [
    "CacheError",
    "ClassRotation",
    "DownloadError",
    "NUM_CLASSES",
    "NUM_DRAWERS",
    "OFFICIAL_MD5",
    "OFFICIAL_URL",
    "PROTOCOLS",
    "SPLITS",
    "MiniImagenetSampler",
    "MiniImagenetSplit",
    "MiniImagenetTasks",
    "OmniglotDataset",
    "OmniglotTasks",
    "PIXEL_SHA256",
    "TaskBatch",
    "TaskIndices",
    "TaskSampler",
    "default_cache_dir",
    "default_download_dir",
    "default_search_paths",
    "download_omniglot",
    "find_data_root",
    "find_mini_imagenet",
    "from_l2l_taskset",
    "l2l_tasksets",
    "load_mini_imagenet",
    "load_omniglot",
    "mini_imagenet_tasks",
    "omniglot_tasks",
    "option_spelling",
    "read_mini_imagenet",
    "split_classes",
    "split_task",
]
