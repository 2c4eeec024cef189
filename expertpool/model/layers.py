"""Building blocks: RMSNorm (fp32 compute), the kernel-dispatched Linear, SwiGLU MLP, YaRN RoPE.

``Linear`` stores ``weight`` in whatever resident format the loader chose (fp32, bf16 or fp8 e4m3
with a ``weight_scale_inv`` block-scale buffer) and always computes through
``expertpool.kernels.linear``, the single dispatch point for FP8 GEMMs. Module and parameter names
equal the Hugging Face checkpoint names, so state_dict keys map one to one.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from expertpool import kernels
from expertpool.kernels import cpu_norm
from expertpool.model.args import ModelArgs, yarn_get_mscale


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and kernels.fast_paths() and cpu_norm.applies(x, self.weight):
            return cpu_norm.rms_norm(x, self.weight, self.eps)  # the same expression in one call
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(dtype) * xf.to(dtype)


class Linear(nn.Module):
    """y = x W^T without bias; W may be fp8 (then ``weight_scale_inv`` holds its 128x128 block scales).

    ``act_scale_fmt``: the scale format of activation quantization on the W8A8 path. DeepSeek-V3's
    inference code passes the checkpoint's ``scale_fmt`` ("ue8m0": power-of-two scales) only in its
    plain ``Linear`` layers (q_a_proj, kv_a_proj_with_mqa and the routed experts), not in the
    column/row-parallel ones; the model sets it on the same layers."""

    def __init__(self, in_features: int, out_features: int, act_scale_fmt: str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.act_scale_fmt = act_scale_fmt
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.register_buffer("weight_scale_inv", None)  # set for FP8 weights
        self.packed = PackedWeights()  # the CPU kernels' packed copy (``pack_for_cpu``)

    def set_fp8(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale_inv", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.packed.linear([self.weight], x)
        if y is not None:
            return y
        return kernels.linear(x, self.weight, self.weight_scale_inv, self.act_scale_fmt)

    def pack_for_cpu(self, w8a8: bool = False) -> bool:
        """Pre-pack a dense CPU weight (the bf16 kernel's layout or oneDNN's, see ``kernels.pack_weight``);
        used while the weight is unchanged (same storage and version) and autograd is off. Costs a second
        copy of the weight (int8 with ``w8a8``: ``PackedWeights.pack``). Returns whether it packed."""
        return self.packed.pack([self.weight], w8a8)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self.weight.dtype == torch.float8_e4m3fn:
            return kernels.weight_dequant(self.weight, self.weight_scale_inv, dtype)
        return self.weight.to(dtype)

    def extra_repr(self) -> str:
        fmt = f", act_scale_fmt={self.act_scale_fmt}" if self.act_scale_fmt else ""
        return f"{self.in_features}, {self.out_features}, dtype={self.weight.dtype}{fmt}"


class PackedWeights:
    """The CPU kernels' packed copy of dense weights [N_i, K] (one linear's, or several concatenated
    along N), made once by ``kernels.pack_weight`` and used through ``kernels.packed_linear`` while every
    weight it was made from is unchanged (same storage and version), autograd is off, the activations
    have the weights' dtype and the fast paths are on. A rewritten weight (a patch) is never read
    through a stale pack: ``Transformer.prepare_for_inference`` packs again."""

    def __init__(self):
        self._packed: tuple | None = None  # (keys of the weights it was made from, packed form)
        self._w8a8 = False  # the form asked for at the last pack

    @staticmethod
    def _key(weights) -> tuple:
        return tuple((w.data_ptr(), w._version) for w in weights)

    def pack(self, weights: list[torch.Tensor], w8a8: bool = False) -> bool:
        """Pack ``weights`` (dense CPU fp32 or bf16, one dtype), concatenated along N; whether it packed.
        ``w8a8``: as int8 weights for the int8 dot product where the kernel takes them
        (``weight_dtype: w8a8``, ``kernels.cpu_w8a8``)."""
        if any(w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16) or w.dtype != weights[0].dtype
               for w in weights):
            self._packed = None
            return False
        key = self._key(weights)
        if self._packed is not None and self._packed[0] == key and self._w8a8 == w8a8:
            return True  # already packed from these weights, in this form
        w = weights[0] if len(weights) == 1 else torch.cat([w.detach() for w in weights], 0)
        packed = kernels.pack_weight(w, w8a8=w8a8)
        self._w8a8 = w8a8
        self._packed = None if packed is None else (key, packed)
        return packed is not None

    def clear(self) -> None:
        """Drop the packed copy (another pack took its place)."""
        self._packed = None

    @property
    def form(self):
        """The packed form (``kernels.pack_weight``'s), or None."""
        return None if self._packed is None else self._packed[1]

    def linear(self, weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor | None:
        """``x`` times the concatenated weights through the pack, or None where it does not apply."""
        p = self._packed
        if p is None or torch.is_grad_enabled() or x.dtype != weights[0].dtype or not kernels.fast_paths() \
                or p[0] != self._key(weights):
            return None
        return kernels.packed_linear(x, p[1])


class MergedPack:
    """Linear layers that read the same input (MLA's two down-projections, an MLP's gate and up), packed
    once as one product on the CPU, as SGLang fuses DeepSeek's q_a / kv_a projections and vLLM merges
    gate and up: one call and one weight stream instead of two, whose cold start does not overlap at a
    decode batch (bench-mini, 16 rows: q_a and kv_a alone ~65-70 us each from DRAM, together ~100). The
    layers keep their own weights (checkpoint names, training, the fallback); the pack replaces their
    separate packed copies (``Transformer.prepare_for_inference``), so it costs no more memory. Used
    as ``PackedWeights`` are. The bf16 kernel (``cpu_gemm``) computes each output column alone, so the
    merged product equals the separate ones bit for bit; oneDNN's fp32 GEMM may round the last bit
    differently."""

    def __init__(self):
        self.packed = PackedWeights()

    def pack(self, linears, w8a8: bool = False) -> bool:
        """Pack the concatenation of the layers' weights; whether it packed."""
        return self.packed.pack([m.weight for m in linears], w8a8)

    def __call__(self, linears, x: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's output of ``x`` (views of one product where the pack applies)."""
        y = self.packed.linear([m.weight for m in linears], x)
        if y is None:
            return [m(x) for m in linears]
        return list(y.split([m.out_features for m in linears], -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: dense layers and the shared experts."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj = Linear(dim, inter)
        self.up_proj = Linear(dim, inter)
        self.down_proj = Linear(inter, dim)
        self.merged_pack = MergedPack()  # gate and up together on CPU

    def merged(self) -> list[Linear]:
        """The layers packed together for inference (``MergedPack``)."""
        return [self.gate_proj, self.up_proj]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.merged_pack(self.merged(), x)
        return self.down_proj(F.silu(gate) * up)


def yarn_inv_freq(args: ModelArgs) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin amplitude factor, exactly as HF ``_compute_yarn_parameters``."""
    d, base = args.qk_rope_head_dim, args.rope_theta
    # explicit device: the loader builds the module skeleton under torch.device("meta")
    pos_freqs = base ** (torch.arange(0, d, 2, dtype=torch.float32, device="cpu") / d)
    inv_freq = 1.0 / pos_freqs
    y = args.rope_scaling
    if y is None:
        return inv_freq, 1.0

    def corr_dim(rot):
        return d * math.log(y.original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = corr_dim(y.beta_fast), corr_dim(y.beta_slow)
    if y.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(d // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (inv_freq / y.factor) * (1 - extrapolation) + inv_freq * extrapolation
    if y.attention_factor is not None:
        attn_factor = y.attention_factor
    elif y.mscale and y.mscale_all_dim:
        attn_factor = yarn_get_mscale(y.factor, y.mscale) / yarn_get_mscale(y.factor, y.mscale_all_dim)
    else:
        attn_factor = yarn_get_mscale(y.factor, 1.0)
    return inv_freq, float(attn_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables over positions; applied to interleaved pairs (the official checkpoint layout)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        inv_freq, self.attn_factor = yarn_inv_freq(args)
        self.register_buffer("inv_freq", inv_freq.to("cpu"), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [...] -> cos, sin [..., d/2] in fp32."""
        freqs = positions.float()[..., None] * self.inv_freq
        return freqs.cos() * self.attn_factor, freqs.sin() * self.attn_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., S, (H,) d] with interleaved pairs (x[2i], x[2i+1]); cos/sin broadcast to [..., S, (1,) d/2].

    Output is de-interleaved ([rotated evens | rotated odds]) like HF's ``rope_interleave``; q and k
    get the same permutation, so attention scores are unchanged and caches stay consistent.
    """
    xf = x.float()
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
