"""Hugging Face checkpoint I/O for DeepSeek-V3: the HF name map, load and save (BF16 and block-FP8).

Loading builds the module skeleton on the meta device and fills it tensor by tensor from lazily
opened safetensors files, so peak memory is the resident model plus one tensor, and a subset of
routed experts (``experts=``) is read without touching the others. Every linear weight is kept in
the requested resident format (``weight_dtype``): FP8 (e4m3 + 128x128 ``weight_scale_inv``,
dequantized on use on CPU), bf16 or fp32; activations run in ``dtype``. The router stays fp32.

Saving writes the HF layout (per-expert names, MTP as ``model.layers.{L+k}``) into a temporary
sibling directory and renames it into place, so a crash never leaves a half-written checkpoint.
Errors name the file or tensor and what was expected (``CheckpointError``). Reading and writing
safetensors files (shards, index, atomic directories) is ``model.safetensors_io``; applying an
expert patch to a loaded model is ``model.patch.apply_patch``.
"""

import ctypes
import logging
import sys
from pathlib import Path

import torch
import torch.nn as nn

from expertpool import kernels
from expertpool.kernels.reference import int8_dequant, int8_weight_quant
from expertpool.model.args import ConfigError, ModelArgs
from expertpool.model.layers import Linear
from expertpool.model.moe import Experts, ExpertIds, Gate, MoE, all_expert_ids, layer_expert_ids
from expertpool.model.safetensors_io import CheckpointError, ShardReader, write_safetensors_dir
from expertpool.model.transformer import Transformer

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
# resident formats (weight_dtype). "int8": the routed experts weight-only int8 with one bf16 scale per
# row (``kernels.reference.int8_weight_quant``), every other linear bf16 under bf16 compute and in the
# compute dtype otherwise (a bf16 linear under fp32 compute is widened on every call): the CPU decode
# fast path.
# "w8a8": resident as "int8"; on CPU the dense linears (attention projections, dense and shared MLPs, the
# output head) are packed as int8 too and run with int8 activations (kernels.cpu_w8a8: Transformer.w8a8).
WEIGHT_DTYPES = {"fp8": FP8, "bf16": torch.bfloat16, "fp32": torch.float32, "int8": torch.int8,
                 "w8a8": torch.int8}
# dtypes by name: the compute dtype (cluster.yaml model.dtype, the CLI) and the dtype of patch tensors
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _release_freed_memory() -> None:
    """Give the loader's freed temporaries (quantization scratch, casts) back to the OS: glibc keeps
    freed small/medium blocks in its heap, which would otherwise inflate resident memory for good."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:  # not glibc (e.g. musl): nothing to trim
            log.debug("malloc_trim unavailable")


def _scale_shape(shape) -> tuple[int, int]:
    return (-(-shape[0] // kernels.BLOCK_SIZE), -(-shape[1] // kernels.BLOCK_SIZE))


def _read_linear(r: ShardReader, name: str, shape) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = r.get(name + ".weight", shape, (FP8, torch.bfloat16, torch.float16, torch.float32))
    if w.dtype == FP8:
        return w, r.get(name + ".weight_scale_inv", _scale_shape(shape), (torch.float32,))
    return w, None


def resident_dtype(kind: str, stored: torch.dtype, weight_dtype: str | None, dtype: torch.dtype,
                   keep_bf16_experts: bool = False) -> torch.dtype:
    """The loader's one rule for the resident format of a weight of ``kind``: "expert" (routed),
    "linear" (every other projection), "head" (lm_head, MTP eh_proj: embeddings-sized, never FP8 in
    V3 checkpoints, kept dense) or "embedding" (rows cast on lookup). ``stored``: the checkpoint's
    dtype; ``weight_dtype``: the requested resident format (None = as stored, non-FP8 in ``dtype``,
    except that with ``keep_bf16_experts`` routed experts stored in bf16 stay bf16: lossless, and
    the CPU expert kernel widens them in registers, so fp32 compute reads half the bytes). "w8a8" keeps
    the formats of "int8" (its int8 copies of the dense linears are packed at ``prepare_for_inference``)."""
    if weight_dtype == "w8a8":
        weight_dtype = "int8"
    if kind == "embedding":  # a compact resident format applies to the (vocab x hidden) embedding too
        return torch.bfloat16 if weight_dtype in ("fp8", "bf16", "int8") else dtype
    if weight_dtype is None:
        target = FP8 if stored == FP8 else dtype
        if kind == "expert" and keep_bf16_experts and stored == torch.bfloat16:
            target = torch.bfloat16
    elif weight_dtype == "int8":
        target = torch.int8 if kind == "expert" else (torch.bfloat16 if dtype == torch.bfloat16 else dtype)
    else:
        target = WEIGHT_DTYPES[weight_dtype]
    if kind == "head" and target == FP8:
        return torch.bfloat16
    return target


def resident_bytes(args: ModelArgs, experts_per_layer: int, weight_dtype: str | None, dtype: torch.dtype) -> dict:
    """Bytes one serving process holds after ``load_checkpoint(..., with_mtp=False)`` with
    ``experts_per_layer`` routed experts per MoE layer, by ``resident_dtype`` (the loader's own rule;
    no weights read): "experts" (routed, with their scales), "dense" (attention, dense MLPs, shared
    experts, routers, norms, and what absorbed attention caches from kv_b_proj at load: its W_UK and
    W_UV^T layouts in the compute dtype, and a dense copy when the resident kv_b is not in the compute
    dtype), "embed_head". Not counted: the CPU kernels' packed copies of the dense linears and of W_UK /
    W_UV^T (``Transformer.prepare_for_inference`` on CPU; no memory check applies to CPU actors)."""
    stored = FP8 if args.fp8 else torch.bfloat16

    def size(t: torch.dtype) -> int:
        return torch.empty((), dtype=t).element_size()

    def linear(kind: str, n: int, k: int) -> int:
        t = resident_dtype(kind, stored, weight_dtype, dtype)
        scales = 0
        if t == FP8:
            scales = -(-n // kernels.BLOCK_SIZE) * -(-k // kernels.BLOCK_SIZE) * 4  # fp32 per 128x128 block
        elif t == torch.int8:
            scales = n * 2  # one bf16 per row
        return n * k * size(t) + scales

    d, h, f = args.hidden_size, args.num_attention_heads, args.moe_intermediate_size
    norm = size(dtype)
    kvb_n, kvb_k = h * (args.qk_nope_head_dim + args.v_head_dim), args.kv_lora_rank
    if args.q_lora_rank is None:
        attn = linear("linear", h * args.qk_head_dim, d)
    else:
        attn = (linear("linear", args.q_lora_rank, d) + args.q_lora_rank * norm
                + linear("linear", h * args.qk_head_dim, args.q_lora_rank))
    attn += (linear("linear", args.kv_cache_dim, d) + args.kv_lora_rank * norm + linear("linear", kvb_n, kvb_k)
             + linear("linear", d, h * args.v_head_dim))
    if resident_dtype("linear", stored, weight_dtype, dtype) != dtype:
        attn += kvb_n * kvb_k * size(dtype)  # MLA.kv_b_weight: dense in the compute dtype, cached at load
    attn += kvb_n * kvb_k * size(dtype)  # MLA.absorbed_weights: W_UK [H, Dn, C] and W_UV^T [H, C, Dv] copies
    block = attn + 2 * d * norm  # + the two layer norms
    moe = (args.n_shared_experts * (2 * linear("linear", f, d) + linear("linear", d, f))
           + args.n_routed_experts * (d + 1) * 4)  # shared experts; router weight and bias in fp32
    dense_mlp = 2 * linear("linear", args.intermediate_size, d) + linear("linear", d, args.intermediate_size)
    n_moe = len(args.moe_layers)
    n_dense = args.num_hidden_layers - n_moe
    expert = 2 * linear("expert", f, d) + linear("expert", d, f)
    # the embedding and the head are stored dense (bf16) in V3 checkpoints, FP8 or not
    embed = size(resident_dtype("embedding", torch.bfloat16, weight_dtype, dtype))
    head = size(resident_dtype("head", torch.bfloat16, weight_dtype, dtype))
    return {"experts": n_moe * experts_per_layer * expert,
            "dense": args.num_hidden_layers * block + n_moe * moe + n_dense * dense_mlp + d * norm,
            "embed_head": args.vocab_size * d * (embed + head)}


def _resident(w: torch.Tensor, s: torch.Tensor | None, target: torch.dtype, scale_fmt=None):
    """Convert one [N, K] weight (+ scale) to the resident format."""
    if target == FP8:
        return (w, s) if w.dtype == FP8 else kernels.weight_quant(w, scale_fmt=scale_fmt)
    if target == torch.int8:
        return int8_weight_quant(kernels.weight_dequant(w, s, torch.float32) if w.dtype == FP8 else w)
    if w.dtype == FP8:
        return kernels.weight_dequant(w, s, target), None
    return w.to(target), None


def _ckpt_name(args: ModelArgs, ours: str) -> str:
    """Our module path -> HF checkpoint name (MTP layers are model.layers.{L+k})."""
    if ours.startswith("model.mtp."):
        k, _, rest = ours[len("model.mtp."):].partition(".")
        return f"model.layers.{args.num_hidden_layers + int(k)}" + (f".{rest}" if rest else "")
    return ours


def _set(module: nn.Module, attr: str, t: torch.Tensor, param: bool) -> None:
    if param:
        setattr(module, attr, nn.Parameter(t, requires_grad=t.is_floating_point() and t.dtype != FP8))
    else:
        module.register_buffer(attr, t)


def load_checkpoint(path, *, dtype: torch.dtype = torch.bfloat16, device="cpu", experts=None,
                    weight_dtype: str | None = None, with_mtp: bool = True,
                    keep_bf16_experts: bool = False) -> Transformer:
    """Load an HF-format DeepSeek-V3 checkpoint directory.

    dtype: compute dtype. weight_dtype: resident linear-weight format, "fp8" | "bf16" | "fp32" | "int8"
    (routed experts int8, other linears bf16) | "w8a8" (as int8, the dense linears run W8A8 on CPU), or None
    (FP8 tensors stay FP8, others take ``dtype``;
    ``keep_bf16_experts``: bf16 routed experts stay bf16, see ``resident_dtype``; serving only, where
    no optimizer updates them).
    experts: global routed-expert ids to load (None = all; a list: the same in every MoE layer; per
    layer: ``model.moe.ExpertIds``).
    """
    path = Path(path)
    try:
        args = ModelArgs.from_dir(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    if weight_dtype is not None and weight_dtype not in WEIGHT_DTYPES:
        raise CheckpointError(f"weight_dtype {weight_dtype!r} unknown; use one of {list(WEIGHT_DTYPES)}")
    _check_expert_ids(args, experts)
    r = ShardReader(path)
    mtp_present = all(f"model.layers.{args.num_hidden_layers + k}.eh_proj.weight" in r
                      for k in range(args.num_nextn_predict_layers))
    if with_mtp and args.num_nextn_predict_layers and not mtp_present:
        log.info("%s: config has %d MTP layer(s) but the checkpoint has none; loading without MTP",
                 path, args.num_nextn_predict_layers)
    with torch.device("meta"):
        model = Transformer(args, experts, with_mtp=with_mtp and mtp_present)
    for mname, module in model.named_modules():
        cname = _ckpt_name(args, mname)
        if isinstance(module, Linear):
            w, s = _read_linear(r, cname, (module.out_features, module.in_features))
            kind = "head" if mname == "lm_head" or mname.endswith("eh_proj") else "linear"
            w, s = _resident(w, s, resident_dtype(kind, w.dtype, weight_dtype, dtype), args.scale_fmt)
            _set(module, "weight", w.to(device), True)
            if s is not None:
                module.register_buffer("weight_scale_inv", s.to(device))
        elif isinstance(module, Experts):
            _load_experts(r, args, cname, module, weight_dtype, dtype, device, keep_bf16_experts)
        elif isinstance(module, Gate):
            gate_w = r.get(cname + ".weight", (args.n_routed_experts, args.hidden_size))
            _set(module, "weight", gate_w.float().to(device), True)
            bias = (r.get(cname + ".e_score_correction_bias", (args.n_routed_experts,)).float()
                    if cname + ".e_score_correction_bias" in r else torch.zeros(args.n_routed_experts))
            _set(module, "e_score_correction_bias", bias.to(device), False)
        elif isinstance(module, nn.Embedding):
            emb = r.get(cname + ".weight", (args.vocab_size, args.hidden_size))
            _set(module, "weight", emb.to(resident_dtype("embedding", emb.dtype, weight_dtype, dtype)).to(device), True)
        else:
            for pname, p in list(module.named_parameters(recurse=False)):
                _set(module, pname, r.get(f"{cname}.{pname}", tuple(p.shape)).to(dtype).to(device), True)
    model.rope.to(device)
    for m in model.modules():
        if isinstance(m, Experts):
            m.expert_ids, m.global_to_local = m.expert_ids.to(device), m.global_to_local.to(device)
    for moe in model.moe_layers():
        moe.expert_load, moe._one = moe.expert_load.to(device), moe._one.to(device)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not leftover, f"loader left tensors unset: {leftover[:5]}"
    r.close()
    model.w8a8 = weight_dtype == "w8a8"
    _release_freed_memory()
    return model.eval()


def _check_expert_ids(args: ModelArgs, experts: ExpertIds) -> None:
    bad = [e for e in all_expert_ids(experts) or [] if not 0 <= e < args.n_routed_experts]
    if bad:
        raise CheckpointError(f"experts={bad} out of range [0, {args.n_routed_experts})")


def load_experts(path, model: Transformer, experts: ExpertIds, *, weight_dtype: str | None = None,
                 device="cpu", keep_bf16_experts: bool = False) -> dict[str, Experts]:
    """Fresh ``Experts`` modules holding the routed experts ``experts`` (global ids; per layer:
    ``model.moe.ExpertIds``) for every MoE layer of ``model`` (main and MTP), read from the
    checkpoint at ``path`` in the same resident formats as ``load_checkpoint``; keyed by module name.
    The model is not touched: a serving actor loads a new expert placement beside the one in use and
    swaps it in at a step boundary."""
    args = model.args
    _check_expert_ids(args, experts)
    r = ShardReader(Path(path))
    out: dict[str, Experts] = {}
    try:
        for mname, moe in model.named_modules():
            if isinstance(moe, MoE):
                with torch.device("meta"):
                    fresh = Experts(args, layer_expert_ids(experts, moe.layer_id))
                name = f"{mname}.experts"
                _load_experts(r, args, _ckpt_name(args, name), fresh, weight_dtype, model.compute_dtype, device,
                              keep_bf16_experts)
                fresh.expert_ids, fresh.global_to_local = fresh.expert_ids.to(device), fresh.global_to_local.to(device)
                out[name] = fresh
    finally:
        r.close()
    return out


def _load_experts(r: ShardReader, args: ModelArgs, cname: str, module: Experts, weight_dtype, dtype, device,
                  keep_bf16_experts: bool = False):
    prefix = cname[: -len(".experts")]  # model.layers.N.mlp
    F_, D = args.moe_intermediate_size, args.hidden_size
    w13s, s13s, w2s, s2s = [], [], [], []
    for e in module.expert_ids.tolist():
        base = f"{prefix}.experts.{e}"
        g, gs = _read_linear(r, base + ".gate_proj", (F_, D))
        u, us = _read_linear(r, base + ".up_proj", (F_, D))
        dn, ds = _read_linear(r, base + ".down_proj", (D, F_))
        tgt = resident_dtype("expert", g.dtype, weight_dtype, dtype, keep_bf16_experts)
        g, gs = _resident(g, gs, tgt, args.scale_fmt)
        u, us = _resident(u, us, tgt, args.scale_fmt)
        dn, ds = _resident(dn, ds, tgt, args.scale_fmt)
        w13s.append(torch.cat([g, u]))
        w2s.append(dn)
        if gs is not None:
            s13s.append(torch.cat([gs, us]))
            s2s.append(ds)
    _set(module, "w13_weight", torch.stack(w13s).to(device), True)
    _set(module, "w2_weight", torch.stack(w2s).to(device), True)
    if s13s:
        module.register_buffer("w13_weight_scale_inv", torch.stack(s13s).to(device))
        module.register_buffer("w2_weight_scale_inv", torch.stack(s2s).to(device))


# ---------------------------------------------------------------- saving

def _dense(w: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    if w.dtype == torch.int8:
        return int8_dequant(w, s)
    return kernels.weight_dequant(w, s, torch.float32) if w.dtype == FP8 else w.float()


def checkpoint_tensors(model: Transformer, *, fp8: bool = False, dtype: torch.dtype = torch.bfloat16,
                       scale_fmt: str | None = None) -> dict[str, torch.Tensor]:
    """The model as HF checkpoint tensors. fp8=True block-quantizes every projection (not embed/head/router)."""
    args = model.args
    out: dict[str, torch.Tensor] = {}

    def put_linear(name, w, s, quantize):
        if quantize:
            if w.dtype == FP8 and s is not None:
                out[name + ".weight"], out[name + ".weight_scale_inv"] = w.contiguous(), s.float().contiguous()
            else:
                q, qs = kernels.weight_quant(_dense(w, s), scale_fmt=scale_fmt)
                out[name + ".weight"], out[name + ".weight_scale_inv"] = q, qs
        else:
            out[name + ".weight"] = _dense(w, s).to(dtype).contiguous()

    for mname, module in model.named_modules():
        cname = _ckpt_name(args, mname)
        if isinstance(module, Linear):
            quant = fp8 and mname != "lm_head" and not mname.endswith("eh_proj")
            put_linear(cname, module.weight.detach(), module.weight_scale_inv, quant)
        elif isinstance(module, Experts):
            if module.num_local != args.n_routed_experts:
                raise CheckpointError(f"{mname}: holds {module.num_local} of {args.n_routed_experts} experts; "
                                      "only a model with all experts can be saved as a full checkpoint")
            prefix = cname[: -len(".experts")]
            F_ = args.moe_intermediate_size
            # the gate half's scale rows: 128-row blocks (fp8) or one per row (int8)
            fb = F_ if module.w13_weight.dtype == torch.int8 else -(-F_ // kernels.BLOCK_SIZE)
            s13, s2 = module.w13_weight_scale_inv, module.w2_weight_scale_inv
            for i, e in enumerate(module.expert_ids.tolist()):
                w13 = module.w13_weight[i].detach()
                base = f"{prefix}.experts.{e}"
                put_linear(base + ".gate_proj", w13[:F_], None if s13 is None else s13[i][:fb], fp8)
                put_linear(base + ".up_proj", w13[F_:], None if s13 is None else s13[i][fb:], fp8)
                put_linear(base + ".down_proj", module.w2_weight[i].detach(), None if s2 is None else s2[i], fp8)
        elif isinstance(module, Gate):
            out[cname + ".weight"] = module.weight.detach().to(dtype).contiguous()
            out[cname + ".e_score_correction_bias"] = module.e_score_correction_bias.float().contiguous()
        else:
            for pname, p in module.named_parameters(recurse=False):
                out[f"{cname}.{pname}"] = p.detach().to(dtype).contiguous()
    for k in range(len(model.model.mtp)):
        base = f"model.layers.{args.num_hidden_layers + k}"
        out[base + ".embed_tokens.weight"] = out["model.embed_tokens.weight"].clone()
        out[base + ".shared_head.head.weight"] = out["lm_head.weight"].clone()
    return out


def save_checkpoint(model: Transformer, out_dir, *, fp8: bool = False, dtype: torch.dtype = torch.bfloat16,
                    scale_fmt: str | None = None, max_shard_bytes: int = 5 << 30,
                    tokenizer_dir: str | Path | None = None) -> Path:
    """Save as an HF-format directory (config.json + safetensors [+ tokenizer files from tokenizer_dir])."""
    args = model.args.replace(fp8=fp8, scale_fmt=scale_fmt if fp8 else None)
    tensors = checkpoint_tensors(model, fp8=fp8, dtype=dtype, scale_fmt=scale_fmt)
    return write_safetensors_dir(tensors, args.to_hf_config(), out_dir, max_shard_bytes=max_shard_bytes,
                                 copy_from=Path(tokenizer_dir) if tokenizer_dir else None)
