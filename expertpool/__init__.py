"""expertpool: serve and fine-tune DeepSeek-V3-class MoE models on Ray expert-parallel actor pools.

Layers (imports flow one way): ``kernels`` and ``model`` at the bottom (no Ray, no pydantic),
``platform`` above them, ``jobs`` and ``cli`` on top.
"""

__version__ = "0.1.0"
