"""The DeepSeek-V3 architecture in plain single-device PyTorch, its checkpoint I/O and tokenizer.

Public API: ``ModelArgs`` (the architecture, from a checkpoint's config.json or a preset),
``Transformer`` (the model) and ``load_checkpoint`` (a Hugging Face format checkpoint into a
``Transformer``). They are resolved on first access (module ``__getattr__``), so importing a light
submodule such as ``expertpool.model.args`` does not import torch.
"""

from typing import TYPE_CHECKING, Any

__all__ = ["ModelArgs", "Transformer", "load_checkpoint"]

if TYPE_CHECKING:
    from expertpool.model.args import ModelArgs
    from expertpool.model.checkpoint import load_checkpoint
    from expertpool.model.transformer import Transformer


def __getattr__(name: str) -> Any:
    if name == "ModelArgs":
        from expertpool.model.args import ModelArgs
        return ModelArgs
    if name == "Transformer":
        from expertpool.model.transformer import Transformer
        return Transformer
    if name == "load_checkpoint":
        from expertpool.model.checkpoint import load_checkpoint
        return load_checkpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
