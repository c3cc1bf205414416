"""The data path: embedded dataset, FFCV preparation, multi-crop loading, fused augmentation.

    image folder / `embedded` --prepare--> .beton --MultiCropLoader--> normalised float crops
    decode + crop + augmentation per image in the loader's workers (CPU training device), or
    decode + crop in the workers and the fused augmentation on the training device (GPU)
The crops and the augmentation follow the config's `CropsConfig` / `AugmentConfig`.
"""
from .eval_loader import EvalLoader
from .crops import epoch_order
from .embedded import ensure_embedded
from .ffcv_loader import ffcv_available
from .fused import MultiCropAugmentation, fused_augment
from .loader import MultiCropLoader
from .prepare import PrepareReport, prepare_dataset, resolve_dataset
from .synthetic import synthetic_crops

__all__ = ["EvalLoader", "MultiCropAugmentation", "MultiCropLoader", "PrepareReport", "epoch_order",
           "ensure_embedded", "ffcv_available", "fused_augment", "prepare_dataset", "resolve_dataset", "synthetic_crops"]
