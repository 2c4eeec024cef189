"""The DeepSeek-V3 causal LM: embedding -> [MLA + (dense MLP | MoE)] x L -> norm -> head, plus MTP.

Module names equal the Hugging Face checkpoint names (``model.layers.3.self_attn.q_a_proj``), except
two places the loader maps: routed experts are stacked per layer (``mlp.experts.w13_weight``), and the
MTP layers (checkpoint ``model.layers.{L+k}``) live in ``model.mtp.{k}``.

Two forwards:
- ``forward(input_ids [B, S])`` -> logits [B, S, V] for every position (expanded MLA; training,
  scoring, parity with transformers).
- ``forward_batch(tokens_N, AttnBatch, logits_rows)`` -> logits for the requested flat rows
  (absorbed MLA over a paged latent cache; generation and serving).

``init_random(args)`` builds a randomly initialised model (tests, the embedded tiny model).
"""

import torch
import torch.nn as nn

from expertpool.model.args import ModelArgs
from expertpool.model.attention import MLA, AttnBatch
from expertpool.model.layers import MLP, Linear, RMSNorm, RotaryEmbedding
from expertpool.model.moe import ExpertIds, MoE, RoutingRecord


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, expert_ids: ExpertIds = None, moe: bool | None = None):
        super().__init__()
        self.layer_id = layer_id
        self.self_attn = MLA(args, layer_id)
        use_moe = args.is_moe_layer(layer_id) if moe is None else moe
        self.mlp = MoE(args, layer_id, expert_ids) if use_moe else MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, cos_sin, batch: AttnBatch | None = None, record: RoutingRecord | None = None):
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, batch)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            return x + self.mlp(h, record, None if batch is None else batch.variant_N)
        return x + self.mlp(h)


class SharedHead(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class MTPLayer(Block):
    """Multi-token prediction module k: h' = eh_proj([enorm(emb(t_{i+k+1})); hnorm(h_i)]) -> block -> head."""

    def __init__(self, args: ModelArgs, k: int, expert_ids: ExpertIds = None):
        super().__init__(args, args.num_hidden_layers + k, expert_ids, moe=True)
        self.enorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.hnorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.eh_proj = Linear(2 * args.hidden_size, args.hidden_size)
        self.shared_head = SharedHead(args)


class DeepseekV3Model(nn.Module):
    def __init__(self, args: ModelArgs, expert_ids: ExpertIds = None, with_mtp: bool = True):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i, expert_ids) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        n_mtp = args.num_nextn_predict_layers if with_mtp else 0
        self.mtp = nn.ModuleList(MTPLayer(args, k, expert_ids) for k in range(n_mtp))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, expert_ids: ExpertIds = None, with_mtp: bool = True):
        super().__init__()
        self.args = args
        self.model = DeepseekV3Model(args, expert_ids, with_mtp)
        self.lm_head = Linear(args.hidden_size, args.vocab_size)
        self.rope = RotaryEmbedding(args)
        # serving in an expert-parallel group on CPU: the head split by vocabulary over the ranks
        # (model.vocab_parallel.VocabParallelHead, set by the worker); None: this process's whole lm_head
        self.vocab_parallel = None
        # weight_dtype w8a8 (set by the loader): prepare_for_inference packs the dense linears as int8
        # for the CPU's int8 dot product, activations quantized per call (kernels.cpu_w8a8)
        self.w8a8 = False

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h) if self.vocab_parallel is None else self.vocab_parallel(h)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def moe_layers(self) -> list[MoE]:
        return [b.mlp for b in list(self.model.layers) + list(self.model.mtp) if isinstance(b.mlp, MoE)]

    @torch.no_grad()
    def prepare_for_inference(self) -> int:
        """One-time work before serving (at load, never per step): cache kv_b_proj's dense weight and
        the absorbed W_UK / W_UV layouts, and on CPU pre-pack every dense linear (kv_b_proj excepted: it is
        used through those caches): the linears that read the same input together (MLA's q_a and kv_a,
        an MLP's gate and up: ``layers.MergedPack``, which then replaces their own packed copies), the
        others alone; with ``w8a8`` as int8 (``kernels.cpu_w8a8``) where the kernel takes them. Returns the
        number of packed linears."""
        packed, merged = 0, set()
        for m in self.modules():
            if isinstance(m, MLA):
                m.absorbed_weights(self.compute_dtype)
            if isinstance(m, (MLA, MLP)):
                group = m.merged()
                if all(lin.weight.dtype == self.compute_dtype for lin in group) and \
                        m.merged_pack.pack(group, self.w8a8):
                    for lin in group:
                        lin.packed.clear()
                        merged.add(id(lin))
                    packed += len(group)
        for name, m in self.named_modules():
            if isinstance(m, Linear) and id(m) not in merged and not name.endswith("kv_b_proj") and \
                    m.weight.dtype == self.compute_dtype:
                packed += m.pack_for_cpu(self.w8a8)
        return packed

    def set_dispatcher(self, dispatcher) -> None:
        for moe in self.moe_layers():
            moe.dispatcher = dispatcher

    def hidden_states(self, input_ids: torch.Tensor, record: RoutingRecord | None = None) -> torch.Tensor:
        """input_ids [B, S] (from position 0) -> final-normed hidden [B, S, D]."""
        x = self.model.embed_tokens(input_ids).to(self.compute_dtype)
        cos_sin = self.rope(torch.arange(input_ids.shape[1], device=input_ids.device))  # once for every layer
        for layer in self.model.layers:
            x = layer(x, cos_sin, record=record)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, record: RoutingRecord | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, record))

    def mtp_logits(self, hidden_BSD: torch.Tensor, input_ids: torch.Tensor, k: int = 0,
                   record: RoutingRecord | None = None) -> torch.Tensor:
        """Next-next-token logits: row i (0 <= i < S-1) predicts token i+2 from h_i and token i+1."""
        mtp = self.model.mtp[k]
        emb = self.model.embed_tokens(input_ids[:, 1:]).to(hidden_BSD.dtype)
        h = mtp.eh_proj(torch.cat([mtp.enorm(emb), mtp.hnorm(hidden_BSD[:, :-1])], -1))
        h = mtp(h, self.rope(torch.arange(h.shape[1], device=h.device)), record=record)
        return self.lm_head(mtp.shared_head.norm(h))

    def forward_batch(self, tokens_N: torch.Tensor, batch: AttnBatch, logits_rows: torch.Tensor | None = None,
                      return_hidden: bool = False):
        """Flat tokens over the paged latent cache; logits only for ``logits_rows`` (default: all).
        ``return_hidden``: also the final-normed hidden of every row [N, D] (the MTP module's input)."""
        x = self.model.embed_tokens(tokens_N).to(self.compute_dtype)
        cos_sin = self.rope(batch.positions_N)  # RoPE once per step, shared by every layer
        for layer in self.model.layers:
            x = layer(x, cos_sin, batch)
        if not return_hidden:
            return self._logits(self.model.norm(x if logits_rows is None else x[logits_rows]))
        h = self.model.norm(x)
        return self._logits(h if logits_rows is None else h[logits_rows]), h

    def mtp_forward_batch(self, hidden_MD: torch.Tensor, next_tokens_M: torch.Tensor, batch: AttnBatch, k: int = 0,
                          logits_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module k over flat rows (speculative decoding): row j holds the hidden of position j (the
        main model's final-normed hidden, or the previous depth's output when drafts are chained) and
        the token at position j + 1, attends over the module's own paged latent cache (cache layer
        ``num_hidden_layers + k``), and predicts the token at j + 2. Returns (block output [M, D],
        logits of ``logits_rows``). ``batch`` must carry no variants: the module has none."""
        mtp = self.model.mtp[k]
        emb = self.model.embed_tokens(next_tokens_M).to(hidden_MD.dtype)
        x = mtp(mtp.eh_proj(torch.cat([mtp.enorm(emb), mtp.hnorm(hidden_MD)], -1)),
                self.rope(batch.positions_N), batch)
        return x, self._logits(mtp.shared_head.norm(x if logits_rows is None else x[logits_rows]))


@torch.no_grad()
def init_random(args: ModelArgs, seed: int = 0, std: float = 0.02, dtype=torch.float32) -> Transformer:
    """A randomly initialised model (normal(0, std) weights, unit norms, zero router bias)."""
    g = torch.Generator().manual_seed(seed)
    model = Transformer(args)
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * std)
    for n, p in model.named_parameters():
        if not n.endswith("gate.weight"):
            p.data = p.data.to(dtype)
    return model.eval()
