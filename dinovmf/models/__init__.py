"""ViT backbones, the DINO(-vMF) head, the multi-crop wrapper and backbone export."""
from .attention import ATTENTION_BACKENDS, Attention, BlockDiagonalLayout, xformers_available
from .export import export_teacher_backbone, load_backbone
from .head import DINOHead
from .multicrop import MultiCropWrapper
from .vit import ARCHITECTURES, VisionTransformer, build_backbone

__all__ = [
    "ARCHITECTURES", "ATTENTION_BACKENDS", "Attention", "BlockDiagonalLayout", "DINOHead",
    "MultiCropWrapper", "VisionTransformer", "build_backbone", "export_teacher_backbone",
    "load_backbone", "xformers_available",
]
