"""Architecture config: a frozen dataclass read from a Hugging Face ``config.json`` (model_type deepseek_v3).

Every key that changes the computation is read; unknown model types and unsupported values raise
``ConfigError`` naming the key. Presets: ``tiny`` (tests: real routing shape, tiny widths),
``bench-mini`` (benchmarks: real MLA head geometry), ``deepseek-v3`` (the 671B config, for planning).
"""

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from expertpool.errors import UserError


class ConfigError(UserError, ValueError):
    """A checkpoint config.json value that expertpool cannot run; the message names the key."""


@dataclass(frozen=True)
class YarnArgs:
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    # MLA
    q_lora_rank: int | None = 1536          # None: no q compression (q_proj)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # MoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"           # "sigmoid" (V3) or "softmax" (V2)
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    # norms and positions
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 163840
    rope_scaling: YarnArgs | None = None
    # the rest
    num_nextn_predict_layers: int = 0
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 1
    # FP8 checkpoint: None, or {"weight_block_size": [128, 128], "scale_fmt": None | "ue8m0"}
    fp8: bool = False
    weight_block_size: tuple[int, int] = (128, 128)
    scale_fmt: str | None = None

    # ---- derived ----
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim ** -0.5
        y = self.rope_scaling
        if y is not None and y.mscale_all_dim:
            m = yarn_get_mscale(y.factor, y.mscale_all_dim)
            scale = scale * m * m
        return scale

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.first_k_dense_replace and layer_id % self.moe_layer_freq == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def kv_cache_dim(self) -> int:
        """Cached entries per token per layer: normalized latent + roped shared key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def num_params(self) -> int:
        d, i, e = self.hidden_size, self.intermediate_size, self.moe_intermediate_size
        h = self.num_attention_heads
        q = (d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * h * self.qk_head_dim
             if self.q_lora_rank else d * h * self.qk_head_dim)
        attn = (q + d * self.kv_cache_dim + self.kv_lora_rank
                + self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim) + h * self.v_head_dim * d)
        total = 2 * self.vocab_size * d if not self.tie_word_embeddings else self.vocab_size * d
        for layer in range(self.num_hidden_layers):
            total += attn + 2 * d
            if self.is_moe_layer(layer):
                total += (self.n_routed_experts + self.n_shared_experts) * 3 * d * e + self.n_routed_experts * (d + 1)
            else:
                total += 3 * d * i
        return total + d

    # ---- HF config.json ----
    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> "ModelArgs":
        mt = cfg.get("model_type")
        if mt not in ("deepseek_v3", "kimi_k2"):
            raise ConfigError(f"{source}: model_type is {mt!r}; expertpool runs 'deepseek_v3' checkpoints "
                              "(DeepSeek-V3/R1, Kimi-K2, Moonlight). Set model_type or use another runtime.")
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name in ("rope_scaling", "fp8", "weight_block_size", "scale_fmt"):
                continue
            if f.name in cfg and cfg[f.name] is not None:
                kw[f.name] = cfg[f.name]
        if "q_lora_rank" in cfg:
            kw["q_lora_rank"] = cfg["q_lora_rank"] or None
        for key in ("bos_token_id", "eos_token_id"):
            if isinstance(kw.get(key), list):
                kw[key] = kw[key][0]
        if cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported; DeepSeek-V3 uses 'silu'")
        if cfg.get("attention_bias"):
            raise ConfigError(f"{source}: attention_bias=true is not supported by the DeepSeek-V3 architecture")
        if kw.get("scoring_func", "sigmoid") not in ("sigmoid", "softmax"):
            raise ConfigError(f"{source}: scoring_func {kw['scoring_func']!r} unsupported; use 'sigmoid' or 'softmax'")
        tm = cfg.get("topk_method")
        if tm not in (None, "noaux_tc", "greedy", "group_limited_greedy"):
            raise ConfigError(f"{source}: topk_method {tm!r} unsupported; use 'noaux_tc'")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
        if rope:
            rtype = rope.get("rope_type", rope.get("type", "default"))
            if "rope_theta" in rope:
                kw["rope_theta"] = rope["rope_theta"]
            if rtype == "yarn":
                for req in ("factor", "original_max_position_embeddings"):
                    if rope.get(req) is None:
                        raise ConfigError(f"{source}: rope_scaling.{req} is required for YaRN")
                kw["rope_scaling"] = YarnArgs(
                    factor=float(rope["factor"]),
                    original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
                    beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
                    mscale=rope.get("mscale"), mscale_all_dim=rope.get("mscale_all_dim"),
                    attention_factor=rope.get("attention_factor"), truncate=rope.get("truncate", True))
            elif rtype != "default":
                raise ConfigError(f"{source}: rope_scaling type {rtype!r} unsupported; use 'yarn' or none")
        q = cfg.get("quantization_config")
        if q:
            if q.get("quant_method") != "fp8":
                raise ConfigError(f"{source}: quantization_config.quant_method {q.get('quant_method')!r} "
                                  "unsupported; only 'fp8' block quantization is")
            wbs = tuple(q.get("weight_block_size") or (128, 128))
            if wbs != (128, 128):
                raise ConfigError(f"{source}: quantization_config.weight_block_size {list(wbs)} unsupported; "
                                  "use [128, 128]")
            if q.get("fmt", "e4m3") != "e4m3":
                raise ConfigError(f"{source}: quantization_config.fmt {q.get('fmt')!r} unsupported; use 'e4m3'")
            kw.update(fp8=True, weight_block_size=wbs, scale_fmt=q.get("scale_fmt"))
        args = cls(**kw)
        args.check(source)
        return args

    def check(self, source: str = "config") -> None:
        def bad(key, msg):
            raise ConfigError(f"{source}: {key}: {msg}")
        if self.n_routed_experts % self.n_group:
            bad("n_group", f"{self.n_routed_experts} routed experts do not split into {self.n_group} groups")
        if not 1 <= self.topk_group <= self.n_group:
            bad("topk_group", f"must be in [1, n_group={self.n_group}], got {self.topk_group}")
        if self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
            bad("num_experts_per_tok", "exceeds the experts in the kept groups")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", "must be even")
        if self.moe_layer_freq < 1:
            bad("moe_layer_freq", "must be >= 1")

    def to_hf_config(self) -> dict:
        cfg = {
            "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "q_lora_rank": self.q_lora_rank, "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim, "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim, "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts, "num_experts_per_tok": self.num_experts_per_tok,
            "n_group": self.n_group, "topk_group": self.topk_group,
            "routed_scaling_factor": self.routed_scaling_factor, "norm_topk_prob": self.norm_topk_prob,
            "scoring_func": self.scoring_func, "topk_method": "noaux_tc",
            "first_k_dense_replace": self.first_k_dense_replace, "moe_layer_freq": self.moe_layer_freq,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings, "hidden_act": "silu",
            "num_nextn_predict_layers": self.num_nextn_predict_layers,
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": False,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "torch_dtype": "bfloat16", "rope_interleave": True,
        }
        y = self.rope_scaling
        if y is not None:
            rope = {"rope_type": "yarn", "type": "yarn", "rope_theta": self.rope_theta, "factor": y.factor,
                    "original_max_position_embeddings": y.original_max_position_embeddings,
                    "beta_fast": y.beta_fast, "beta_slow": y.beta_slow}
            for k in ("mscale", "mscale_all_dim", "attention_factor"):
                if getattr(y, k) is not None:
                    rope[k] = getattr(y, k)
            cfg["rope_scaling"] = rope
        if self.fp8:
            q = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                 "weight_block_size": list(self.weight_block_size)}
            if self.scale_fmt:
                q["scale_fmt"] = self.scale_fmt
            cfg["quantization_config"] = q
        return cfg

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelArgs":
        p = Path(path) / "config.json"
        if not p.exists():
            raise ConfigError(f"{p}: not found; a checkpoint directory needs a Hugging Face config.json")
        try:
            cfg = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON ({e})") from e
        return cls.from_hf_config(cfg, str(p))

    def replace(self, **kw) -> "ModelArgs":
        return dataclasses.replace(self, **kw)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# The embedded tiny model (``model.embedded``: the ``tiny`` preset with random weights and a tokenizer).
# This name is its cache directory's and its default served model id (``platform.config.ModelConfig``).
EMBEDDED_MODEL_NAME = "expertpool-tiny"

_V3_YARN = YarnArgs(factor=40.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                    mscale=1.0, mscale_all_dim=1.0)

PRESETS: dict[str, ModelArgs] = {
    "tiny": ModelArgs(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=16,
        num_hidden_layers=3, num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
        routed_scaling_factor=2.5, first_k_dense_replace=1, max_position_embeddings=2048,
        rope_scaling=YarnArgs(factor=4.0, original_max_position_embeddings=512, mscale=1.0, mscale_all_dim=1.0),
        num_nextn_predict_layers=1),
    "bench-mini": ModelArgs(
        vocab_size=32000, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=8, q_lora_rank=512, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=6, n_group=8, topk_group=4,
        routed_scaling_factor=2.5, first_k_dense_replace=1, max_position_embeddings=16384,
        rope_scaling=YarnArgs(factor=4.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0)),
    "deepseek-v3": ModelArgs(rope_scaling=_V3_YARN, num_nextn_predict_layers=1, fp8=True),
}


def preset(name: str) -> ModelArgs:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
