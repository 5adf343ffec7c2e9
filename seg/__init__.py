"""seg: semantic-segmentation heads trained on cached, frozen DINOv2/DINOv3 features.

The public Python surface is the names below; everything else is internal and may move. They load
lazily, so `import seg` (and the `seg` command's start-up) stays cheap:

    import seg
    summary = seg.extract(seg.ExtractConfig(data="DATA", out="CACHE"))
    metrics = seg.train(seg.resolve_preset(3, {"epochs": 5}), "CACHE", "RUN")
    seg.evaluate(seg.EvalOptions(run="RUN", cache="CACHE"))
    labels = seg.load("RUN").predict(rgb_array)       # HxW class ids at the image's size
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute)
_PUBLIC = {
    # stage one: images -> tokens in a cache
    "ExtractConfig": ("seg.extract_features", "ExtractConfig"),
    "ExtractSummary": ("seg.extract_features", "ExtractSummary"),
    "extract": ("seg.extract_features", "extract"),
    # the cache
    "FeatureCache": ("seg.cache", "FeatureCache"),
    "describe_cache": ("seg.cache", "describe"),
    "verify_cache": ("seg.cache", "verify"),
    # stage two: tokens -> a trained head
    "TrainConfig": ("seg.train.presets", "TrainConfig"),
    "PRESETS": ("seg.train.presets", "PRESETS"),
    "resolve_preset": ("seg.train.presets", "resolve"),
    "RunOptions": ("seg.train_head", "RunOptions"),
    "train": ("seg.train_head", "train"),
    # stage three: scores and predictions
    "EvalOptions": ("seg.evaluate", "EvalOptions"),
    "evaluate": ("seg.evaluate", "evaluate"),
    "PredictOptions": ("seg.predict", "PredictOptions"),
    "predict": ("seg.predict", "predict"),
    "load": ("seg.infer.api", "load"),
    "Predictor": ("seg.infer.api", "Predictor"),
    "load_run": ("seg.infer.runs", "load_run"),
    "Segmenter": ("seg.infer.segmenter", "Segmenter"),
    # deployment: a run as one checked ONNX graph
    "ExportOptions": ("seg.export_model", "ExportOptions"),
    "export_onnx": ("seg.export_model", "export_onnx"),
    # building blocks
    "ClassTable": ("seg.data.classes", "ClassTable"),
    "load_class_table": ("seg.data.classes", "load_class_table"),
    "load_backbone": ("seg.backbones", "load_backbone"),
    "HEADS": ("seg.heads", "HEADS"),
    "build_head": ("seg.heads", "build_head"),
    "head_logits": ("seg.heads", "head_logits"),
    "confusion_matrix": ("seg.scoring.metrics", "confusion_matrix"),
    "summarize": ("seg.scoring.metrics", "summarize"),
    "SegError": ("seg.runtime.errors", "SegError"),
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    try:
        module, attr = _PUBLIC[name]
    except KeyError:
        raise AttributeError(f"module 'seg' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
