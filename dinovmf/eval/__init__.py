"""Evaluation of frozen features: weighted kNN (the DINO protocol) and a linear probe."""
from .features import extract_features
from .knn import knn_classify, knn_predict
from .linear import LinearProbe, linear_probe_objective, probe_accuracy, train_linear_probe

__all__ = ["extract_features", "knn_classify", "knn_predict", "LinearProbe", "linear_probe_objective", "probe_accuracy",
           "train_linear_probe"]
