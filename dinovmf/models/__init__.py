"""ViT backbones, the DINO(-vMF) head, the multi-crop wrapper, the training network and backbone export."""
from .attention import ATTENTION_BACKENDS, Attention, xformers_available
from .export import export_teacher_backbone, load_backbone
from .head import DINOHead
from .multicrop import MultiCropWrapper
from .ssl import SSLModel, build_ssl_model, init_student, model_args
from .vit import ARCHITECTURES, VisionTransformer, build_backbone

__all__ = [
    "ARCHITECTURES", "ATTENTION_BACKENDS", "Attention", "DINOHead",
    "MultiCropWrapper", "SSLModel", "VisionTransformer", "build_backbone", "build_ssl_model", "init_student",
    "export_teacher_backbone", "load_backbone", "model_args", "xformers_available",
]
