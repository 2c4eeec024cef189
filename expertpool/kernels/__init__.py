"""FP8 kernels API: the one entry point the model calls for linears and routed experts.

Contract (shapes in names; E = local experts, F = expert intermediate width, D = hidden):
- ``linear(x, weight, scale)``: ``weight`` is ``[N, K]`` in any dtype. If it is float8_e4m3fn,
  ``scale`` is the fp32 ``[ceil(N/128), ceil(K/128)]`` dequant multiplier (HF ``weight_scale_inv``).
  Output has ``x.dtype``.
- ``moe_experts(x_TD, topk_ids_TK, topk_weights_TK, w13_E2FD, w13_scale, w2_EDF, w2_scale)``:
  SwiGLU experts ``down(silu(gate x) * up x)`` weighted by the routing weights and summed per token.
  ``topk_ids`` are *local* expert indices in [0, E); -1 marks a slot owned elsewhere (skipped).
  ``w13`` stacks gate rows [0, F) and up rows [F, 2F). For FP8, ``w13_scale`` is
  ``[E, 2*ceil(F/128), ceil(D/128)]``: the gate half and the up half are block-quantized separately
  (so F need not be a multiple of 128), and ``w2_scale`` is ``[E, ceil(D/128), ceil(F/128)]``.
- ``act_quant`` / ``weight_quant`` / ``weight_dequant``: DeepSeek-V3 block quantization.

Every call goes through ``backend`` (the choice of kernel backend): Triton kernels (``quant``,
``fp8_gemm``, ``fused_moe``) on CUDA with compute capability >= 8.9, the pure-torch references
(``reference``) elsewhere; ``EXPERTPOOL_KERNELS=torch|triton|auto`` or ``with use_backend(...)``
override it. This package imports without Triton: kernel modules are imported only when the Triton
path runs.
"""

from expertpool.kernels.backend import (  # noqa: F401
    act_quant,
    fast_paths,
    int8_linear,
    linear,
    moe_experts,
    pack_weight,
    packed_linear,
    paged_mla_decode,
    route,
    select_backend,
    use_backend,
    weight_dequant,
    weight_quant,
)
from expertpool.kernels.reference import (  # noqa: F401
    BLOCK_SIZE,
    FP8_E4M3_MAX,
    ROW_TILE,
    batch_invariant,
    dequant_w13_ref,
    pad_rows,
    row_bucket,
    set_batch_invariant,
    shape_bucket,
    tile_rows,
)
