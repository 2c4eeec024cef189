"""The declarative platform config: the pydantic schema of ``cluster.yaml`` and everything derived from it.

Usage: ``cfg = load_config("cluster.yaml")`` reads, parses and validates the file and raises
:class:`ConfigError` (one line per problem: ``file: dotted.field: problem; fix``). Once the model
architecture is known (``ModelArgs`` from the checkpoint), call ``cfg.validate_against_model(args)``
before any actor starts; a training entry point also calls ``cfg.get_job(name).check_dataset()``. The
derived values live in methods, in one place: ``cfg.pool.placement_group_bundles()``, ``cfg.pool.placement_problem(n)``,
``cfg.serving.num_kv_blocks(bytes_per_token)``, ``cfg.serve_deployment_options()`` (for
``serve.deployment(...).options(**...)``) and ``cfg.serve_config()`` (a Serve config file for
``serve deploy`` and a RayService ``serveConfigV2``). Kubernetes manifests come from
:mod:`expertpool.platform.kuberay`. Inside Serve, ``parse_config(args["config"], source=...)`` rebuilds
the config from the dict that ``serve_config()`` embeds.

Layout: this module is the whole schema's entry point (the ``model:`` and ``kubernetes:`` sections,
the top level, loading) and re-exports every name; the shared pieces (``ConfigError``, the closed
base model, ``ActorResources``) live in ``platform.config_base``, the ``pool:`` section in
``platform.pool_config``, the ``serving:`` section in ``platform.serving_config`` and the ``train:``
section in ``platform.train_config``.

Contract: every model is closed (``extra="forbid"``) and every field is documented, so a typo is an
error, never a silently ignored key. Derived defaults (``model.name``, ``model.tokenizer``,
``esft.p``, ``output_dir``, ``domain``, ``kubernetes.name``) are filled in at validation time, so a
loaded config is explicit and its ``model_dump()`` re-loads to the same config. Rules that need the
model architecture (expert counts) cannot run at load time and live in ``validate_against_model``;
rules that touch the file system (the dataset) live in ``TrainJobConfig.check_dataset``.

Not here: no Ray import (this module runs in the CLI and in tests without a cluster), no actors, no
file system access at load time other than reading the YAML itself.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, PrivateAttr, ValidationError, field_validator, model_validator

from expertpool.model import storage
from expertpool.model.args import EMBEDDED_MODEL_NAME, ModelArgs
from expertpool.platform.config_base import (GIB, K8S_NAME, RULE_ERROR_TYPE, ActorResources, Closed, ConfigError,
                                             ConfigProblem, check_location, rule_error)
from expertpool.platform.pool_config import (EplbConfig, PoolActorResources, PoolConfig, RecoveryConfig,
                                             WidthAutoscalingConfig, WidthRange)
from expertpool.platform.serving_config import (API_KEY_ENV, AutoscalingConfig, KVCacheConfig, ServingConfig,
                                                SpeculativeConfig)
from expertpool.platform.train_config import DatasetConfig, EsftConfig, MtpDistillConfig, TrainConfig, TrainJobConfig

# re-exported: the whole schema is importable from here
__all__ = ["API_KEY_ENV", "DEFAULT_IMPORT_PATH", "DEPLOYMENT_NAME", "GIB", "HF_TOKEN_KEY", "SERVE_SECTIONS",
           "ActorResources", "AutoscalingConfig",
           "ClusterConfig", "ConfigError", "ConfigProblem", "DatasetConfig", "EplbConfig", "EsftConfig",
           "KVCacheConfig", "KubernetesConfig", "ModelConfig", "MtpDistillConfig", "PoolActorResources", "PoolConfig",
           "RecoveryConfig", "ServingConfig", "SpeculativeConfig", "TrainConfig", "TrainJobConfig",
           "WidthAutoscalingConfig", "WidthRange", "field_paths", "load_config", "parse_config"]

DEPLOYMENT_NAME = "ExpertPool"  # the Serve deployment that hosts one expert-parallel group per replica
HF_TOKEN_KEY = "token"  # the key of kubernetes.hf_token_secret's Secret
DEFAULT_IMPORT_PATH = "expertpool.platform.app:build_app"
# what a Serve replica reads: a Serve config's args carry these sections only, so an edit elsewhere
# (a training job, the Kubernetes settings) leaves the deployment, and its replicas, untouched
SERVE_SECTIONS = ("model", "pool", "serving")


# ---------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------


class ModelConfig(Closed):
    path: str | None = Field(None, description="The Hugging Face format checkpoint (config.json + safetensors): a "
                             "local directory, a Hugging Face repo id `org/name` or `org/name@revision` (`hf://org/"
                             "name` forces the repo reading), or an `s3://` / `gs://` URI. Each expert actor fetches "
                             "only the dense shards and the shards of its experts into the local cache "
                             "(EXPERTPOOL_CACHE; the hub cache for repos). None = the embedded tiny "
                             "DeepSeek-V3-architecture model, created on first use in a cache dir.")
    name: str | None = Field(None, description="Served model id (the OpenAI `model` field). Default: the basename "
                             f"of `path`, or `{EMBEDDED_MODEL_NAME}` for the embedded model. Must not contain ':' "
                             "(fine-tuned variants are served as `NAME:DOMAIN`).")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Compute dtype of activations and non-quantized weights. auto = bfloat16 where the "
        "actor's hardware runs it natively (a CPU with AVX-512 BF16 or AMX, unless "
        "ONEDNN_MAX_CPU_ISA caps oneDNN below AVX512_CORE_BF16; a GPU of compute capability >= 8.0), "
        "float32 elsewhere; each actor decides on its own device and logs the choice and the reason.")
    weight_dtype: Literal["fp8", "bf16", "fp32", "int8", "w8a8"] | None = Field(
        None, description="Resident format of the expert and linear weights. None = as stored in the checkpoint. "
        "int8 = routed experts weight-only int8 with one scale per row (the fastest CPU decode: the expert kernel "
        "widens the codes in registers; logits differ from bf16 weights by ~1e-2 relative, see docs/benchmarks.md), "
        "other linears bf16 under bfloat16 compute and float32 under float32 compute. Under float32 compute on a "
        "CPU, None keeps bf16-stored routed experts bf16 (the expert kernel widens them in registers) and loads "
        "the other linears as fp32; bf16 leaves the other linears bf16, widened on every call (2.7-2.9x slower "
        "generation than None under an AVX2 cap in docs/benchmarks.md): use it with bfloat16 compute. w8a8 = as int8, "
        "and on a CPU with AVX512_VNNI the dense linears (attention projections, dense and shared MLPs, output head) "
        "also run on int8 weights with int8 activations quantized per row and 128 columns (the int8 dot product "
        "does twice the bf16 dot product's multiplies; more logit error than int8, see docs/architecture.md); "
        "elsewhere it is int8, logged.")
    tokenizer: str | None = Field(None, description="Where the tokenizer (tokenizer.json) is: any location `path` "
                                  "accepts. Default: `path`; for the embedded model, its embedded tokenizer.")

    @field_validator("path", "tokenizer")
    @classmethod
    def _location(cls, v: str | None) -> str | None:
        return check_location(v)

    @model_validator(mode="after")
    def _derive(self) -> ModelConfig:
        if self.name is None:
            self.name = storage.basename(self.path) if self.path else EMBEDDED_MODEL_NAME
        if ":" in self.name or not self.name:
            raise rule_error("name", f"'{self.name}' is not a usable model id (empty, or contains ':', which separates "
                        "BASE:DOMAIN variants)", "set model.name to an id without ':'")
        if self.tokenizer is None:
            self.tokenizer = self.path
        return self


# ---------------------------------------------------------------------------------------------------
# kubernetes
# ---------------------------------------------------------------------------------------------------


class HeadResources(Closed):
    cpu: float = Field(2.0, gt=0, description="Head pod CPUs (the head runs no replicas or actors: num-cpus 0).")
    memory_gb: float = Field(8.0, gt=0, description="Head pod memory in GiB (GCS, dashboard, Serve controller).")


class KubernetesConfig(Closed):
    name: str | None = Field(None, description="Base name of the RayService / RayCluster / RayJob objects. "
                             "None = serving.app_name made DNS-safe.")
    namespace: str = Field("default", description="Kubernetes namespace of the generated objects.")
    image: str = Field("expertpool:0.1.0", description="Container image with Ray 2.60 and this repository "
                       "installed, repository root as WORKDIR (see docs/operations.md).")
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = Field("IfNotPresent",
                                                                          description="Container imagePullPolicy.")
    ray_version: str = Field("2.60.0", description="Ray version in the image (RayCluster spec.rayVersion).")
    head: HeadResources = Field(default_factory=HeadResources, description="Head pod size.")
    memory_per_cpu_gb: float = Field(4.0, gt=0, description="Worker pod memory per CPU in GiB, used when "
                                     "actor_resources.memory_gb / worker_resources.memory_gb is unset.")
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field("ClusterIP", description="Type of the "
                                                                           "head service (dashboard, Serve).")
    idle_timeout_s: int = Field(60, ge=0, description="Seconds an idle worker pod lives before the autoscaler "
                                "removes it.")
    upscaling_mode: Literal["Default", "Aggressive", "Conservative"] = Field("Default", description="Ray "
                                                                             "autoscaler upscaling speed.")
    api_key_secret: str | None = Field(None, description=f"Secret (key `api-key`) exposed as env {API_KEY_ENV} "
                                       "in every pod. Use this instead of serving.api_key on Kubernetes.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="nodeSelector of worker pods, e.g. "
                                          "{nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}.")
    hf_token_secret: str | None = Field(None, description=f"Secret (key `{HF_TOKEN_KEY}`) exposed as env HF_TOKEN "
                                        "in every pod, for gated or private Hugging Face models.")
    pod_template: dict[str, Any] = Field(default_factory=dict, description="A partial PodTemplateSpec (`metadata`, "
                                         "`spec`) deep-merged into every generated pod template: mappings merge key "
                                         "by key, lists of named entries (containers, env, volumes, volumeMounts, "
                                         "ports) merge by `name`, other lists (tolerations, imagePullSecrets) are "
                                         "appended. A container named `ray` applies to the Ray container of every "
                                         "pod. For tolerations, volumes, serviceAccountName, annotations, env from "
                                         "Secrets.")

    @model_validator(mode="after")
    def _check(self) -> KubernetesConfig:
        if self.name is not None and (not K8S_NAME.match(self.name) or len(self.name) > 40):
            raise rule_error("name", f"'{self.name}' is not a DNS-1123 label of at most 40 characters",
                        "use lowercase letters, digits and '-'")
        extra = sorted(set(self.pod_template) - {"metadata", "spec"})
        if extra:
            raise rule_error("pod_template", f"has {extra} at the top; a PodTemplateSpec has `metadata` and `spec`",
                             "move those keys under pod_template.spec (or pod_template.metadata)")
        for key in ("metadata", "spec"):
            if not isinstance(self.pod_template.get(key, {}), dict):
                raise rule_error(f"pod_template.{key}", "must be a mapping", f"write pod_template.{key} as a mapping")
        return self


def _model_label(path: str | None) -> str:
    return f"'{path}'" if path else "the embedded tiny model"


# ---------------------------------------------------------------------------------------------------
# top level
# ---------------------------------------------------------------------------------------------------


class ClusterConfig(Closed):
    model: ModelConfig = Field(default_factory=ModelConfig, description="What is served (and the default base).")
    pool: PoolConfig = Field(default_factory=PoolConfig, description="The expert-parallel actor group of one replica.")
    serving: ServingConfig = Field(default_factory=ServingConfig, description="Serve application, engine limits, "
                                   "autoscaling.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Fine-tuning jobs.")
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig, description="KubeRay manifest settings.")

    _source: str = PrivateAttr("cluster.yaml")

    @model_validator(mode="after")
    def _check(self) -> ClusterConfig:
        if self.kubernetes.name is None:
            dns_safe = re.sub(r"[^a-z0-9-]+", "-", self.serving.app_name.lower()).strip("-")[:40].rstrip("-")
            self.kubernetes.name = dns_safe or "expertpool"
        for name, job in self.train.jobs.items():
            if job.publish_to is None:
                continue
            if job.publish_to != self.serving.app_name:
                raise rule_error(f"train.jobs.{name}.publish_to", f"no serving app named '{job.publish_to}'",
                            f"set publish_to to '{self.serving.app_name}' (serving.app_name) or remove it")
            if job.base_model != self.model.path:
                raise rule_error(f"train.jobs.{name}.base_model", f"{_model_label(job.base_model)} differs from "
                            f"model.path ({_model_label(self.model.path)}), so the result cannot be hot-swapped "
                            "into the served model",
                            "set base_model equal to model.path or remove publish_to")
        return self

    @property
    def source(self) -> str:
        """The file this config was loaded from (names the file in error messages)."""
        return self._source

    def get_job(self, name: str) -> TrainJobConfig:
        if name not in self.train.jobs:
            known = ", ".join(sorted(self.train.jobs)) or "none defined"
            hint = difflib.get_close_matches(name, list(self.train.jobs), n=1)
            raise ConfigError([ConfigProblem("train.jobs", f"no job named '{name}' (known: {known}); "
                                             + (f"did you mean '{hint[0]}'? " if hint else "")
                                             + "pass one of the known names or add it under train.jobs")],
                              self._source)
        return self.train.jobs[name]

    def validate_against_model(self, args: ModelArgs) -> dict[str, Any]:
        """Rules that need the architecture (``args``: the checkpoint's ``ModelArgs``): experts split over the
        actors and each job's workers, ``max_seq_len`` and each job's ``seq_len`` within the model's
        ``max_position_embeddings``, a ``kv_cache.memory_gb`` budget that holds one sequence and, with a
        declared ``pool.actor_resources.gpu_memory_gb``, the per-actor memory plan. ``expertpool validate``,
        ``deploy`` and every replica call this one method, so they agree. Raises ConfigError listing every
        problem; returns the derived values (``expertpool validate`` prints them)."""
        n_routed_experts = args.n_routed_experts
        max_position_embeddings = args.max_position_embeddings
        kv_bytes_per_token = self.kv_bytes_per_token(args)
        problems: list[ConfigProblem] = []
        derived: dict[str, Any] = {}
        placement = self.pool.placement_problem(n_routed_experts)
        if placement:
            problems.append(ConfigProblem("pool.actors_per_replica", placement))
        else:
            from expertpool.platform.placement import slots_per_rank, usable_redundant
            w = self.pool.width
            derived["pool.expert_slots_per_actor"] = slots_per_rank(
                n_routed_experts, usable_redundant(n_routed_experts, self.pool.redundant_experts, w), w)
        for name, job in self.train.jobs.items():
            problem = job.experts_problem(n_routed_experts, prefix=f"train.jobs.{name}.")
            if problem:
                problems.append(ConfigProblem(*problem))
            else:
                derived[f"train.jobs.{name}.experts_per_worker"] = n_routed_experts // job.workers
            if job.seq_len > max_position_embeddings:
                problems.append(ConfigProblem(f"train.jobs.{name}.seq_len", f"({job.seq_len}) exceeds the model's "
                                              f"max_position_embeddings ({max_position_embeddings}); set seq_len "
                                              f"to at most {max_position_embeddings}"))
        if self.serving.max_seq_len > max_position_embeddings:
            problems.append(ConfigProblem("serving.max_seq_len", f"({self.serving.max_seq_len}) exceeds the model's "
                                          f"max_position_embeddings ({max_position_embeddings}); set max_seq_len "
                                          f"to at most {max_position_embeddings}"))
        kv = self.serving.kv_cache
        if kv.memory_gb is not None:
            blocks = self.serving.num_kv_blocks(kv_bytes_per_token)
            if blocks * kv.block_size < self.serving.max_seq_len:
                need = math.ceil(self.serving.max_seq_len / kv.block_size) * kv.block_size * kv_bytes_per_token
                problems.append(ConfigProblem("serving.kv_cache.memory_gb", f"{kv.memory_gb} GiB holds {blocks} "
                                              f"blocks, fewer than one sequence of max_seq_len "
                                              f"({self.serving.max_seq_len}); set memory_gb to at least "
                                              f"{need / GIB:.3g} or lower serving.max_seq_len"))
        derived["serving.kv_cache.num_blocks"] = self.serving.num_kv_blocks(kv_bytes_per_token)
        res = self.pool.actor_resources
        actors = self.pool.min_width  # the narrowest group holds the most experts per actor
        if res.gpu_memory_gb is not None and not placement:
            from expertpool.platform import actor_memory as memory_plan
            try:
                plan = memory_plan.check(args, actors, int(res.gpu_memory_gb * GIB),
                                         where="pool.actor_resources.gpu_memory_gb",
                                         redundant=self.pool.redundant_experts, **self.plan_inputs())
                derived["pool.memory_per_actor_gib"] = round(plan.total / GIB, 1)
            except ValueError as e:
                problems.append(ConfigProblem("pool.actor_resources.gpu_memory_gb", str(e)))
        if problems:
            raise ConfigError(problems, self._source)
        return derived

    def kv_bytes_per_token(self, args: ModelArgs, dtype: str | None = None) -> int:
        """KV-cache bytes of one token on one actor (every layer's latent and rope key, plus the MTP layer's
        when speculative decoding is on). ``dtype``: the resolved compute dtype; for ``auto`` bfloat16, as
        :meth:`plan_inputs` assumes (an actor that resolves float32 on a CPU caches twice as much)."""
        from expertpool.model.attention import PagedLatentCache
        layers = args.num_hidden_layers + (args.num_nextn_predict_layers if self.serving.speculative else 0)
        return PagedLatentCache.bytes_per_token(args, layers, self.plan_inputs(dtype)["dtype"])

    def plan_inputs(self, dtype: str | None = None) -> dict[str, Any]:
        """The memory plan's keyword inputs from this config. ``dtype``: the resolved compute dtype; for
        ``auto`` the plan assumes bfloat16 (every GPU of compute capability >= 8.0 runs it), and each
        actor re-checks with the dtype it resolves on its device."""
        import torch
        name = dtype or ("bfloat16" if self.model.dtype == "auto" else self.model.dtype)
        return {"weight_dtype": self.model.weight_dtype, "dtype": getattr(torch, name),
                "max_seq_len": self.serving.max_seq_len, "max_num_batched_tokens": self.serving.max_num_batched_tokens,
                "max_batch_size": self.serving.max_batch_size}

    # --- derivations for Ray Serve ------------------------------------------------------------------

    def serve_deployment_options(self) -> dict[str, Any]:
        """Options of the expert-pool deployment, for ``serve.deployment(**opts)`` or ``Deployment.options(**opts)``.

        Includes ``name`` so the deployment matches the ``deployments`` entry of :meth:`serve_config`."""
        return {
            "name": DEPLOYMENT_NAME,
            "max_ongoing_requests": self.serving.max_ongoing_requests,
            "max_queued_requests": self.serving.max_queued_requests,
            "autoscaling_config": self.serving.autoscaling.ray_autoscaling_config(),
            "placement_group_bundles": self.pool.placement_group_bundles(),
            "placement_group_strategy": self.pool.placement_strategy,
            "ray_actor_options": self.pool.replica_actor_options(),
            "health_check_period_s": self.serving.health_check_period_s,
            "health_check_timeout_s": self.serving.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.serving.graceful_shutdown_timeout_s,
            "graceful_shutdown_wait_loop_s": 1.0,
            # published patches: Serve hands user_config to the replicas' ``reconfigure``, at start and
            # on every change, without restarting them (a change of args would restart every replica)
            "user_config": {"patches": dict(self.serving.patches)},
        }

    def serving_dump(self) -> dict[str, Any]:
        """The sections a replica reads (``SERVE_SECTIONS``), without the declared patches (they travel in
        the deployment's user_config): the ``args.config`` of the Serve application."""
        data = self.model_dump(mode="json", include=set(SERVE_SECTIONS))
        data["serving"].pop("patches")
        return data

    def serve_app_config(self, import_path: str = DEFAULT_IMPORT_PATH) -> dict[str, Any]:
        """The application entry of a Serve config (``applications[]``)."""
        return {
            "name": self.serving.app_name,
            "route_prefix": self.serving.route_prefix,
            "import_path": import_path,
            "args": {"config": self.serving_dump()},
            "deployments": [self.serve_deployment_options()],
        }

    def serve_config(self, import_path: str = DEFAULT_IMPORT_PATH, *, host: str | None = None) -> dict[str, Any]:
        """A Serve config file (``serve deploy``; RayService ``serveConfigV2``). ``args.config`` carries model,
        pool and serving (``serving_dump``), so ``build_app`` rebuilds what a replica needs with
        :func:`parse_config` and an edit to a training job leaves the file byte-identical; the declared
        patches are the deployment's ``user_config``. ``host`` overrides serving.host."""
        return {
            "proxy_location": "EveryNode",
            "http_options": {"host": host or self.serving.host, "port": self.serving.port},
            "applications": [self.serve_app_config(import_path)],
        }


# ---------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


ENV_PREFIX = "env:"  # load_config("env:VAR"): the YAML in an environment variable (generated RayJobs)


def load_config(path: str | os.PathLike) -> ClusterConfig:
    """Read and validate a cluster.yaml, or with ``env:VAR`` the YAML held in environment variable VAR.
    Raises ConfigError naming the file, the field and the fix."""
    source = str(path)
    if source.startswith(ENV_PREFIX):
        text = os.environ.get(source[len(ENV_PREFIX):])
        if text is None:
            raise ConfigError([ConfigProblem("", "the environment variable is not set; the generated RayJob sets it "
                                             "in its runtime environment, elsewhere pass a cluster.yaml path")],
                              source)
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError([ConfigProblem("", "file not found; pass the path of a cluster.yaml "
                                             "(the repository root has a documented example)")], source) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError([ConfigProblem("", f"{where}invalid YAML ({problem}); fix the syntax")], source) from None
    return parse_config({} if data is None else data, source=source)


def parse_config(data: Any, source: str = "cluster.yaml") -> ClusterConfig:
    """Validate an already-parsed config (e.g. ``args["config"]`` inside Serve). Raises ConfigError."""
    if not isinstance(data, Mapping):
        raise ConfigError([ConfigProblem("", f"the top level must be a mapping of sections, got "
                                         f"{type(data).__name__}; start the file with e.g. `model:`")], source)
    try:
        cfg = ClusterConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError([_explain(err) for err in e.errors()], source) from None
    cfg._source = source
    for job in cfg.train.jobs.values():
        job._source = source
    return cfg


def _explain(err: Mapping[str, Any]) -> ConfigProblem:
    """Turn one pydantic error into ``field: problem; fix``."""
    loc = [str(part) for part in err["loc"]]
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == RULE_ERROR_TYPE:
        loc = [part for part in loc if not part.startswith("[")]  # a tagged union's tag
        path = ".".join(loc + ([ctx["field"]] if ctx["field"] else []))
        return ConfigProblem(path, f"{ctx['problem']}; {ctx['fix']}")
    loc = [part for part in loc if "[" not in part]  # pydantic tags like "function-after[...]" are not fields
    path = ".".join(loc)
    leaf = loc[-1] if loc else "value"
    if kind == "extra_forbidden":
        allowed = _allowed_fields(loc[:-1])
        hint = difflib.get_close_matches(leaf, allowed, n=1)
        return ConfigProblem(path, "unknown field; " + (f"did you mean '{hint[0]}'? " if hint else "")
                             + f"remove it or use one of: {', '.join(allowed)}")
    if kind == "missing":
        return ConfigProblem(path, f"required field is missing; set {leaf}")
    if kind == "literal_error":
        return ConfigProblem(path, f"got {value!r}; set {leaf} to one of {ctx.get('expected', '')}")
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()))
        return ConfigProblem(path, f"must be {op} {bound}, got {value!r}; set {leaf} to a value {op} {bound}")
    if kind in ("model_type", "dict_type"):
        return ConfigProblem(path, f"expected a mapping of fields, got {value!r}; write {leaf} as a YAML mapping")
    expected = next((text for prefix, text in _EXPECTED.items() if kind.startswith(prefix)), "a valid value")
    return ConfigProblem(path, f"{err['msg'].rstrip('.')}, got {value!r}; set {leaf} to {expected}")


_EXPECTED = {"int_": "an integer", "float_": "a number", "bool_": "true or false", "string_": "a string",
             "list_": "a YAML list"}


def _annotation_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``Model``, ``Model | None`` or ``dict[str, Model]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _annotation_model(arg)
        if found is not None:
            return found
    return None


def _allowed_fields(loc: list[str]) -> list[str]:
    """Field names of the model at ``loc`` (a dotted path that may pass through ``jobs.<name>``)."""
    model: type[BaseModel] = ClusterConfig
    parts = iter(loc)
    for part in parts:
        field = model.model_fields.get(part)
        inner = _annotation_model(field.annotation) if field is not None else None
        if inner is None:
            break
        if getattr(field.annotation, "__origin__", None) is dict:
            next(parts, None)  # the dict key (a job name) is not a field
        model = inner
    return list(model.model_fields)


def field_paths(model: type[BaseModel] = ClusterConfig, prefix: str = "") -> list[tuple[str, Any]]:
    """Every leaf field as (dotted path, FieldInfo); ``jobs.<name>`` is written ``jobs.NAME``. Used for docs."""
    out: list[tuple[str, Any]] = []
    for fname, field in model.model_fields.items():
        path = f"{prefix}{fname}"
        inner = _annotation_model(field.annotation)
        if inner is None:
            out.append((path, field))
        elif getattr(field.annotation, "__origin__", None) is dict:
            out.extend(field_paths(inner, f"{path}.NAME."))
        else:
            out.extend(field_paths(inner, f"{path}."))
    return out
