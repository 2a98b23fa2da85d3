"""AVCap captioner: model (avcap.model), generation (avcap.generate), checkpoints, tokenizer, metrics.

The main names are importable from the package; they load lazily so that light submodules (tokenizer,
metrics) don't pay for importing torch/timm.
"""
from importlib import import_module

_EXPORTS = {
    "AVCap": "avcap.model",
    "AVCapConfig": "avcap.model",
    "beam_search": "avcap.generate",
    "greedy_search": "avcap.generate",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'avcap' has no attribute {name!r}")
