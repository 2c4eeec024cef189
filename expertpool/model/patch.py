"""Patches: the output of ESFT (a few routed experts) or of an MTP job (the draft module), replacing the base's.

A patch is a directory, written atomically (``safetensors_io.atomic_dir``), read from a local path or
from object storage (``read_patch`` fetches an s3:// / gs:// one into the local cache):

- ``manifest.json``: ``format``, ``base_model`` (``path`` and ``fingerprint``, plus the expert
  geometry), ``domain``, ``dtype`` of the stored tensors, ``layers`` ({layer id: [global expert
  ids]}), ``num_experts``, ``kind``, ``mtp`` (the names of the MTP module's other tensors) and free-form
  ``info`` (how it was trained).
- ``experts.safetensors``: HF per-expert names, ``model.layers.{L}.mlp.experts.{e}.{gate,up,down}_proj.weight``,
  plus the MTP tensors under their HF names (``model.layers.{L}.eh_proj.weight``,
  ``model.layers.{L}.self_attn.q_a_proj.weight``, ...), so a patch reads like a slice of the base checkpoint.

Two kinds (``kind`` in the manifest):
- ``experts`` (ESFT): served beside the base as a variant ``MODEL:DOMAIN`` (``add_variant``).
  When the job trained the MTP module too (``mtp_loss_weight > 0``), the patch also holds the MTP
  layer's selected experts and its non-expert tensors; a variant is served with the base's MTP module
  (the module has no variants), and ``apply_patch`` (merging in place) writes them.
- ``mtp`` (``mode: mtp``, self-distillation): the MTP module only (all its routed experts and its
  non-expert tensors). It is applied in place to the served base model (``apply_patch``), so the
  speculative drafts of every request use it; the main model's weights are untouched.

The MTP module's non-expert tensors (``mtp_tensors``) are everything of ``model.layers.{L}`` except
the routed experts and the router (``mlp.gate``: routing stays frozen, as in ESFT) and the embedding
and output head (shared with the main model).

The base fingerprint (``base_fingerprint``) is cheap and robust: sha256 over the canonical
``config.json``, the names/shapes/dtypes of every router and routed-expert tensor (safetensors
headers only), and the bytes of the router (gate weight and correction bias) of the first MoE layer
plus every layer's correction bias. It tells apart different architectures, renamed or resharded
layouts and different trainings of one architecture, without reading the experts themselves.

``apply_patch`` overwrites the patched experts a model holds and skips those it does not own, so
each expert-parallel actor applies the same patch to its own share. Rows are written in the
model's resident format by ``Experts.write_expert`` (FP8 re-quantized, gate and up separately, as
the loader does); serving a patch beside the base instead (``add_variant``) uses the same
writer; MTP tensors are written in the model's resident format (``checkpoint._resident``, FP8
re-quantized). Everything else in the model is left untouched. A patch does not carry router
changes: ESFT keeps the router frozen.

A served variant is bookkeeping on the ``Experts`` modules, kept here rather than in the model: the
variant's experts are appended as extra local slots, and ``Experts.global_to_local`` grows by one
table of ``n_routed`` ids per variant, so routing id ``e + v * n_routed`` (``MoE.forward``) reaches
the fine-tuned copy of expert ``e`` where variant ``v`` has one and the base's slot otherwise. The
MTP module has no variants: it serves every variant with the base's weights.
"""

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from expertpool.errors import UserError
from expertpool.model.checkpoint import DTYPES, _resident
from expertpool.model.layers import Linear
from expertpool.model.moe import Experts
from expertpool.model.safetensors_io import ShardReader, atomic_dir
from expertpool.model.storage import StorageError, fetch_dir

log = logging.getLogger(__name__)

PATCH_FORMAT = "expertpool-expert-patch/v1"
MANIFEST = "manifest.json"
TENSORS = "experts.safetensors"
KINDS = ("experts", "mtp")
# parts of an MTP layer that no patch changes: routing (frozen, as in ESFT) and the routed experts
# (stored per expert, as in every patch)
MTP_NOT_DENSE = ("mlp.experts.", "mlp.gate.")


class PatchError(UserError, ValueError):
    """A patch that cannot be written, read or applied; the message names the file and the fix."""


@dataclass(frozen=True)
class Patch:
    path: Path
    base_model: str                 # base checkpoint directory the patch was trained from
    base_fingerprint: str
    domain: str
    dtype: str                      # dtype of the stored tensors
    experts: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]]  # layer -> expert -> (w13 [2F, D], w2 [D, F])
    manifest: dict = field(repr=False)
    kind: str = "experts"           # experts: a served variant (ESFT); mtp: the MTP module, applied in place
    mtp: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # HF name -> MTP non-expert tensor

    @property
    def expert_ids(self) -> dict[int, list[int]]:
        return {layer: sorted(ex) for layer, ex in sorted(self.experts.items())}

    @property
    def num_experts(self) -> int:
        return sum(len(ex) for ex in self.experts.values())


def _expert_name(layer: int, expert: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"


def mtp_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The MTP module's non-expert parameters as (HF name, parameter): what an MTP-training job trains
    beside the module's routed experts, and what a patch carries of it (see the module docstring)."""
    out = []
    for k, layer in enumerate(model.model.mtp):
        base = f"model.layers.{model.args.num_hidden_layers + k}"
        for name, p in layer.named_parameters():
            if not name.startswith(MTP_NOT_DENSE):
                out.append((f"{base}.{name}", p))
    return out


def _mtp_modules(model) -> dict[str, tuple[torch.nn.Module, str]]:
    """HF name of each MTP non-expert parameter -> (its owning module, attribute)."""
    out = {}
    for k, layer in enumerate(model.model.mtp):
        base = f"model.layers.{model.args.num_hidden_layers + k}"
        for mname, mod in layer.named_modules():
            for pname, _ in mod.named_parameters(recurse=False):
                full = f"{mname}.{pname}" if mname else pname
                if not full.startswith(MTP_NOT_DENSE):
                    out[f"{base}.{full}"] = (mod, pname)
    return out


@torch.no_grad()
def mtp_tensors(model) -> dict[str, torch.Tensor]:
    """The MTP module's non-expert tensors (HF names), dense fp32 on the CPU (FP8 linears dequantized)."""
    out = {}
    for name, (mod, attr) in _mtp_modules(model).items():
        if isinstance(mod, Linear) and attr == "weight":
            out[name] = mod.dense_weight(torch.float32).detach().cpu().clone()
        else:
            out[name] = getattr(mod, attr).detach().float().cpu().clone()
    return out


def base_fingerprint(model_dir) -> str:
    """sha256 identity of a base checkpoint directory (see the module docstring)."""
    model_dir = Path(model_dir)
    cfg_file = model_dir / "config.json"
    if not cfg_file.exists():
        raise PatchError(f"{cfg_file}: not found; base_model must be an HF checkpoint directory")
    h = hashlib.sha256()
    h.update(json.dumps(json.loads(cfg_file.read_text()), sort_keys=True).encode())
    r = ShardReader(model_dir)
    routing = sorted(k for k in r.weight_map if ".mlp.gate." in k or ".mlp.experts." in k)
    for name in routing:
        shape, dtype = r.meta(name)
        h.update(f"{name}:{shape}:{dtype};".encode())
    gates = sorted((k for k in routing if k.endswith(".mlp.gate.weight")), key=lambda k: int(k.split(".")[2]))
    for name in gates[:1] + [k for k in routing if k.endswith("e_score_correction_bias")]:
        h.update(r.get(name).float().numpy().tobytes())
    return h.hexdigest()


def save_patch(out_dir, *, base_model_dir, domain: str, experts: dict, dtype: torch.dtype = torch.float32,
               info: dict | None = None, base_name: str | None = None, kind: str = "experts",
               mtp: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a patch directory atomically. experts: {layer_id: {expert_id: (w13 [2F, D], w2 [D, F])}}.
    ``base_name``: the base as the manifest names it (its location); default ``base_model_dir``.
    ``kind``: ``experts`` (ESFT) or ``mtp``; ``mtp``: the MTP module's non-expert tensors by HF name
    (``mtp_tensors``), required for kind ``mtp``."""
    assert kind in KINDS, f"patch kind {kind!r} is not one of {KINDS}"
    if kind == "mtp" and not mtp:
        raise PatchError("an MTP patch needs the MTP module's tensors; the model has no MTP layer")

    dtype_name = next((k for k, v in DTYPES.items() if v == dtype), None)
    if dtype_name is None:
        raise PatchError(f"dtype {dtype} cannot be stored in a patch; use one of {list(DTYPES)}")
    base_model_dir = Path(base_model_dir)
    cfg = json.loads((base_model_dir / "config.json").read_text()) if (base_model_dir / "config.json").exists() else {}
    F_, D = cfg.get("moe_intermediate_size"), cfg.get("hidden_size")
    tensors, layers = {}, {}
    for layer, ex in sorted(experts.items()):
        layers[str(int(layer))] = sorted(int(e) for e in ex)
        for e, (w13, w2) in sorted(ex.items()):
            assert (w13.dim() == 2 and w2.dim() == 2 and w13.shape[0] == 2 * w2.shape[1]
                    and w13.shape[1] == w2.shape[0]), \
                f"layer {layer} expert {e}: w13 {list(w13.shape)} / w2 {list(w2.shape)} are not [2F, D] / [D, F]"
            if F_ is not None and (w2.shape[1] != F_ or w2.shape[0] != D):
                raise PatchError(f"layer {layer} expert {e}: w2 has shape {list(w2.shape)}, but {base_model_dir} "
                                 f"has hidden_size {D} and moe_intermediate_size {F_}; save experts of that model")
            f = w2.shape[1]
            w13 = w13.detach().to("cpu", dtype)
            tensors[_expert_name(layer, e, "gate_proj")] = w13[:f].contiguous()
            tensors[_expert_name(layer, e, "up_proj")] = w13[f:].contiguous()
            tensors[_expert_name(layer, e, "down_proj")] = w2.detach().to("cpu", dtype).contiguous()
    for name, t in sorted((mtp or {}).items()):
        assert name.startswith("model.layers.") and ".mlp.experts." not in name, f"{name} is not an MTP tensor"
        tensors[name] = t.detach().to("cpu", dtype).contiguous()
    if not tensors:
        raise PatchError("no experts to save; an ESFT run that selected no experts has nothing to patch")
    manifest = {
        "format": PATCH_FORMAT,
        "base_model": {"path": base_name or str(base_model_dir), "fingerprint": base_fingerprint(base_model_dir),
                       "n_routed_experts": cfg.get("n_routed_experts"), "hidden_size": D,
                       "moe_intermediate_size": F_},
        "domain": domain,
        "dtype": dtype_name,
        "layers": layers,
        "num_experts": sum(len(v) for v in layers.values()),
        "kind": kind,
        "mtp": sorted(mtp or {}),
        "tensors": TENSORS,
        "info": info or {},
    }
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / TENSORS), metadata={"format": "pt"})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(out_dir)


def read_patch(patch_dir, *, base_model_dir=None) -> Patch:
    """Read and validate a patch: a directory, or an s3:// / gs:// location (fetched into the local cache
    first, ``storage.fetch_dir``). With base_model_dir, also check it was trained from that base."""
    try:
        patch_dir = fetch_dir(patch_dir)
    except StorageError as e:
        raise PatchError(str(e)) from e
    mfile = patch_dir / MANIFEST
    if not mfile.exists():
        raise PatchError(f"{mfile}: not found; point at a patch directory written by the fine-tuning job")
    try:
        m = json.loads(mfile.read_text())
    except json.JSONDecodeError as e:
        raise PatchError(f"{mfile}: not valid JSON ({e.msg} at line {e.lineno}); rewrite the patch") from None
    if not isinstance(m, dict) or m.get("format") != PATCH_FORMAT:
        raise PatchError(f"{mfile}: format is {m.get('format') if isinstance(m, dict) else None!r}, expected "
                         f"{PATCH_FORMAT!r}; this is not an expertpool expert patch (or it is from a newer version)")
    for key in ("base_model", "domain", "dtype", "layers"):
        if key not in m:
            raise PatchError(f"{mfile}: missing key {key!r}; the patch is incomplete, rewrite it")
    kind = m.get("kind", "experts")  # patches written before kinds existed are expert patches
    if kind not in KINDS:
        raise PatchError(f"{mfile}: kind {kind!r} unknown; expected one of {list(KINDS)} (a newer version's patch?)")
    if m["dtype"] not in DTYPES:
        raise PatchError(f"{mfile}: dtype {m['dtype']!r} unknown; expected one of {list(DTYPES)}")
    base = m["base_model"]
    if not isinstance(base, dict) or "fingerprint" not in base or "path" not in base:
        raise PatchError(f"{mfile}: base_model needs 'path' and 'fingerprint'")
    tfile = patch_dir / m.get("tensors", TENSORS)
    if not tfile.exists():
        raise PatchError(f"{tfile}: not found; the patch is incomplete, rewrite it")
    experts: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    want_dtype = DTYPES[m["dtype"]]
    try:
        with safe_open(str(tfile), framework="pt") as f:
            names = set(f.keys())
            expected = set()
            for layer_s, ids in m["layers"].items():
                layer = int(layer_s)
                experts[layer] = {}
                for e in ids:
                    parts = []
                    for proj in ("gate_proj", "up_proj", "down_proj"):
                        name = _expert_name(layer, e, proj)
                        expected.add(name)
                        if name not in names:
                            raise PatchError(f"{tfile}: tensor {name!r} listed in {MANIFEST} is missing; "
                                             "the patch is incomplete, rewrite it")
                        t = f.get_tensor(name)
                        if t.dtype != want_dtype:
                            raise PatchError(f"{tfile}: tensor {name!r} has dtype {t.dtype}, manifest says "
                                             f"{m['dtype']}")
                        parts.append(t)
                    g, u, d = parts
                    if g.shape != u.shape or d.shape != (g.shape[1], g.shape[0]):
                        raise PatchError(f"{tfile}: layer {layer} expert {e}: gate {list(g.shape)}, up "
                                         f"{list(u.shape)}, down {list(d.shape)} are not [F, D], [F, D], [D, F]")
                    experts[layer][int(e)] = (torch.cat([g, u]), d)
            mtp = {}
            for name in m.get("mtp", []):
                expected.add(name)
                if name not in names:
                    raise PatchError(f"{tfile}: MTP tensor {name!r} listed in {MANIFEST} is missing; "
                                     "the patch is incomplete, rewrite it")
                mtp[name] = f.get_tensor(name)
            extra = names - expected
            if extra:
                raise PatchError(f"{tfile}: tensors not listed in {MANIFEST}: {sorted(extra)[:3]}; "
                                 "the manifest and tensors disagree, rewrite the patch")
    except SafetensorError as e:
        raise PatchError(f"{tfile}: cannot read safetensors ({e}); the file is truncated or corrupt") from e
    patch = Patch(path=patch_dir, base_model=str(base["path"]), base_fingerprint=str(base["fingerprint"]),
                  domain=str(m["domain"]), dtype=m["dtype"], experts=experts, manifest=m, kind=kind, mtp=mtp)
    if kind == "mtp" and not mtp:
        raise PatchError(f"{mfile}: an MTP patch without MTP tensors ('mtp' is empty); rewrite the patch")
    if base_model_dir is not None:
        check_base(patch, base_model_dir)
    return patch


def check_base(patch: Patch, base_model_dir) -> None:
    """Raise PatchError unless ``base_model_dir`` is the checkpoint the patch was trained from."""
    fp = base_fingerprint(base_model_dir)
    if fp != patch.base_fingerprint:
        raise PatchError(f"{patch.path / MANIFEST}: trained from base {patch.base_model} (fingerprint "
                         f"{patch.base_fingerprint[:12]}), but the model is {base_model_dir} (fingerprint {fp[:12]}); "
                         "apply the patch to the model it was trained from, or retrain it on this one")


@torch.no_grad()
def apply_patch(model, patch: Patch, *, base_model_dir=None) -> dict[int, list[int]]:
    """Overwrite the patched experts that ``model`` holds; skip experts it does not own.

    Returns {layer: [global expert ids written]}. FP8 experts are re-quantized. With base_model_dir,
    first check that the patch was trained from that base. The patch's MTP tensors are written into
    the model's MTP module when it has one (``apply_mtp``)."""
    if base_model_dir is not None:
        check_base(patch, base_model_dir)
    args = model.args
    moes = {moe.layer_id: moe for moe in model.moe_layers()}
    F_, D = args.moe_intermediate_size, args.hidden_size
    written: dict[int, list[int]] = {}
    for layer, ex in sorted(patch.experts.items()):
        if layer not in moes:
            if layer >= args.num_hidden_layers and layer < args.num_hidden_layers + args.num_nextn_predict_layers:
                log.info("patch %s: MTP layer %d is not loaded in this model; skipping it", patch.path, layer)
                continue
            raise PatchError(f"{patch.path / MANIFEST}: layer {layer} is not an MoE layer of this model "
                             f"(MoE layers: {sorted(moes)}); the patch is for a different architecture")
        experts = moes[layer].experts
        for e, (w13, w2) in sorted(ex.items()):
            if not 0 <= e < args.n_routed_experts:
                raise PatchError(f"{patch.path / MANIFEST}: layer {layer} expert {e} is outside "
                                 f"[0, {args.n_routed_experts}); the patch is for a different architecture")
            if tuple(w13.shape) != (2 * F_, D) or tuple(w2.shape) != (D, F_):
                raise PatchError(f"{patch.path / TENSORS}: layer {layer} expert {e} has w13 {list(w13.shape)} / w2 "
                                 f"{list(w2.shape)}, the model needs [{2 * F_}, {D}] / [{D}, {F_}]")
            local = int(experts.global_to_local[e])
            if local < 0:
                continue
            experts.write_expert(local, w13, w2)
            written.setdefault(layer, []).append(e)
    if patch.mtp and len(model.model.mtp):
        apply_mtp(model, patch)
    return written


@torch.no_grad()
def apply_mtp(model, patch: Patch) -> int:
    """Overwrite the MTP module's non-expert tensors with the patch's, in place and in the model's
    resident format (FP8 re-quantized); returns how many. The main model is not touched."""
    targets = _mtp_modules(model)
    unknown = sorted(set(patch.mtp) - set(targets))
    if unknown:
        raise PatchError(f"{patch.path / MANIFEST}: MTP tensors {unknown[:3]} are not in this model's MTP module "
                         f"({len(model.model.mtp)} loaded); the patch is for a different architecture")
    for name, t in patch.mtp.items():
        mod, attr = targets[name]
        cur = getattr(mod, attr)
        if tuple(cur.shape) != tuple(t.shape):
            raise PatchError(f"{patch.path / TENSORS}: {name} has shape {list(t.shape)}, the model needs "
                             f"{list(cur.shape)}; the patch is for a different architecture")
        if isinstance(mod, Linear) and attr == "weight" and cur.dtype in (torch.float8_e4m3fn, torch.int8):
            q, s = _resident(t.to(cur.device, torch.float32), None, cur.dtype, model.args.scale_fmt)
            cur.copy_(q)
            mod.weight_scale_inv.copy_(s)
        else:
            # on the parameter itself, not .data (whose version counter is separate): caches derived from
            # a weight (packed CPU linears, the absorbed MLA kv_b_proj) are keyed by its version
            cur.copy_(t.to(cur.device, cur.dtype))
    return len(patch.mtp)


@torch.no_grad()
def add_variant(model, experts_by_layer: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]]) -> int:
    """Serve a fine-tuned variant (layer -> expert -> (w13 [2F, D], w2 [D, F])) beside the base weights
    of every main-model MoE layer; returns its index for ``AttnBatch.build(variants=...)``."""
    layers = [m for m in model.moe_layers() if m.layer_id < model.args.num_hidden_layers]
    idx = {layers[0].experts.num_variants if layers else 1}
    for moe in layers:
        idx.add(add_layer_variant(moe.experts, experts_by_layer.get(moe.layer_id, {})))
    assert len(idx) == 1, f"MoE layers disagree on the variant count: {idx}"
    return idx.pop()


@torch.no_grad()
def add_layer_variant(experts: Experts, rows: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> int:
    """One layer's share of ``add_variant``: the given experts (global id -> (w13, w2)) that ``experts``
    holds are appended as extra local slots in its resident format, every other expert is shared with
    the base. Returns the variant's index v (routing ids offset by v * n_routed)."""
    E, v = experts.n_routed, experts.num_variants
    table = experts.global_to_local[:E].clone()
    ids, resident = [], []
    for e, (w13, w2) in sorted(rows.items()):
        if experts.global_to_local[e] < 0:
            continue  # owned by another rank
        table[e] = experts.num_local + len(resident)
        ids.append(e)
        resident.append(experts.resident(w13, w2))
    dev = experts.w13_weight.device
    if resident:
        q13, s13, q2, s2 = zip(*resident)
        experts.w13_weight = nn.Parameter(torch.cat([experts.w13_weight.data, torch.stack(q13)]), requires_grad=False)
        experts.w2_weight = nn.Parameter(torch.cat([experts.w2_weight.data, torch.stack(q2)]), requires_grad=False)
        if s13[0] is not None:
            experts.w13_weight_scale_inv = torch.cat([experts.w13_weight_scale_inv, torch.stack(s13)])
            experts.w2_weight_scale_inv = torch.cat([experts.w2_weight_scale_inv, torch.stack(s2)])
        experts.expert_ids = torch.cat([experts.expert_ids, torch.tensor(ids, dtype=torch.long, device=dev)])
    experts.global_to_local = torch.cat([experts.global_to_local, table.to(dev)])
    experts.identity_map = False
    return v
