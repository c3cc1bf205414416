"""The data path: embedded dataset, FFCV preparation, multi-crop loading, batched augmentation.

    image folder / `embedded` --prepare--> .beton --MultiCropLoader--> uint8 crops (FFCV or PIL)
    --MultiCropAugmentation (on the training device)--> normalised float crops, global first
"""
from .augment import MultiCropAugmentation
from .crops import MultiCropConfig, epoch_order
from .embedded import ensure_embedded
from .eval_loader import EvalLoader
from .ffcv_loader import ffcv_available
from .loader import MultiCropLoader
from .prepare import PrepareReport, prepare_dataset, resolve_dataset

__all__ = ["EvalLoader", "MultiCropAugmentation", "MultiCropConfig", "MultiCropLoader", "PrepareReport",
           "epoch_order", "ensure_embedded", "ffcv_available", "prepare_dataset", "resolve_dataset"]
