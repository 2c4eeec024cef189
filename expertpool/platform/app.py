"""The Ray Serve application: one ``ExpertPoolServer`` replica = one engine (one expert-parallel group).

Thin on purpose (STYLE principle 7): the replica parses its config, builds its engine and tokenizer
through injectable factories, and hands both to ``api.OpenAIServer``; the FastAPI app is built at
replica start (``__serve_build_asgi_app__``, Serve's late-bound ingress), so routes are not tied to
a module-level app object. Deployment options (placement-group bundles for the engine's actors,
autoscaling, queue limits, health-check timing) all come from ``cfg.serve_deployment_options()``.

Entry points:
  * ``build_app(args)`` — Serve ``import_path`` target ``expertpool.platform.app:build_app`` with
    ``args: {config: <cluster config mapping or path to cluster.yaml>, engine_factory?: "mod:attr",
    tokenizer_factory?: "mod:attr"}`` (what ``cfg.serve_config()`` writes);
  * ``build_app_from_config(cfg, engine_factory=None, tokenizer_factory=None)`` — in-process use and
    tests, where the factories may be callables ``(ClusterConfig) -> Engine | Tokenizer``;
  * ``deploy(cfg)`` — start (or join) Ray and Serve and deploy the application from its Serve config,
    declaratively (as ``serve deploy`` would), without blocking (``expertpool serve``, benchmarks);
    returns the base URL. Declarative, so ``expertpool publish`` can later change its user_config.

Replica-level methods: ``reconfigure(user_config)`` (Serve calls it at start and on every change of
the deployment's user_config: the declared patches, ``platform.patches``), ``check_health`` (Serve
calls it every ``serving.health_check_period_s``; it runs the engine's health check, so a dead
expert-parallel actor fails the replica and Serve replaces it) and ``stats``, reachable through a
Serve handle. A handle call reaches ONE replica.

The API key is resolved inside the replica (``serving.api_key``, else env ``EXPERTPOOL_API_KEY`` of
the replica process), so a key from the environment never travels in the Serve config.
"""

import importlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.deployment import Application

from expertpool.model import storage
from expertpool.platform.api import OpenAIServer, build_fastapi_app
from expertpool.platform.config import ClusterConfig, load_config, parse_config
from expertpool.platform.logs import show_info_logs
from expertpool.platform.metrics import ServerMetrics
from expertpool.platform.patches import PatchSet, apply_app, apply_width, wait_running
from expertpool.platform.proxy import ingress_mismatch

logger = logging.getLogger(__name__)

Factory = str | Callable[[ClusterConfig], Any]


class AppArgs(BaseModel):
    """``args`` of the Serve application (``applications[].args`` in a Serve config)."""

    model_config = ConfigDict(extra="forbid")
    config: dict[str, Any] | str = Field(description="The cluster config as a mapping, or the path of a cluster.yaml "
                                         "readable where the application is built.")
    engine_factory: str | None = Field(None, description="'module:attr' of a callable (ClusterConfig) -> Engine. "
                                       "None = expertpool.platform.engine:build_engine.")
    tokenizer_factory: str | None = Field(None, description="'module:attr' of a callable (ClusterConfig) -> "
                                          "Tokenizer. None = the tokenizer of model.tokenizer (or the embedded model).")


def import_attr(path: str) -> Any:
    """``'pkg.mod:attr'`` (or ``'pkg.mod.attr'``) -> the object."""
    mod, sep, attr = path.partition(":")
    if not sep:
        mod, _, attr = path.rpartition(".")
    if not mod or not attr:
        raise ValueError(f"'{path}' is not an import path; write it as 'package.module:attribute'")
    return getattr(importlib.import_module(mod), attr)


def _resolve(factory: Factory | None, default: Callable[[ClusterConfig], Any]) -> Callable[[ClusterConfig], Any]:
    if factory is None:
        return default
    return import_attr(factory) if isinstance(factory, str) else factory


def default_engine(cfg: ClusterConfig) -> Any:
    from expertpool.platform.engine import build_engine  # heavy (torch, actors): only where the engine runs

    return build_engine(cfg)


def default_tokenizer(cfg: ClusterConfig) -> Any:
    from expertpool.model.tokenizer import Tokenizer

    path = cfg.model.tokenizer
    if path is None:
        from expertpool.model.embedded import ensure_embedded_model

        path = ensure_embedded_model()
    return Tokenizer.from_dir(storage.resolve_model(path, weights=False))  # a remote one: its small files only


@serve.deployment
@serve.ingress()
class ExpertPoolServer:
    """One replica: engine + tokenizer + OpenAI API. ``config`` is a ClusterConfig or its dict dump."""

    def __init__(self, config: ClusterConfig | dict[str, Any], engine_factory: Factory | None = None,
                 tokenizer_factory: Factory | None = None):
        show_info_logs(use_serve_handlers=True)
        cfg = config if isinstance(config, ClusterConfig) else parse_config(config, source="serve args.config")
        self.cfg = cfg
        self.engine = _resolve(engine_factory, default_engine)(cfg)
        tokenizer = _resolve(tokenizer_factory, default_tokenizer)(cfg)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.api = OpenAIServer(self.engine, tokenizer, api_key=cfg.serving.resolve_api_key(),
                                metrics=ServerMetrics(replica=self.replica_id, model_name=self.engine.model_ids()[0]),
                                reasoning_parser=cfg.serving.reasoning_parser)
        self.patches = PatchSet()  # filled by reconfigure: Serve calls it right after this constructor
        self.width_error: str | None = None
        if (why := ingress_mismatch(cfg.serving.ingress)) is not None:
            logger.warning("%s", why)
        logger.info("replica up: serving %s (max_seq_len=%d, auth=%s)", self.engine.model_ids(),
                    self.engine.max_seq_len, "on" if self.api.api_key else "off")

    def __serve_build_asgi_app__(self):
        return build_fastapi_app(self.api)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load the patches declared in the deployment's user_config that this replica does not serve
        yet (``platform.patches``); Serve calls it at start and on every change, without a restart."""
        await self.patches.apply(self.engine, user_config)
        self.width_error = await apply_width(self.engine, user_config)

    async def check_health(self) -> None:
        await self.engine.check_health()

    async def stats(self) -> dict:
        """Engine stats of this replica (running/waiting, KV blocks, steps, per-expert tokens, recoveries,
        the actors of its group) and the replica's own pid."""
        return {**self.engine.stats(), **self.patches.stats(), "replica_pid": os.getpid(),
                "replica_id": self.replica_id, "width_error": self.width_error}

    async def load_patch(self, domain: str, patch_dir: str) -> str:
        """Load a patch into THIS replica only (a handle call reaches one replica), outside the
        declaration, so a restarted or added replica does not have it: for tests and debugging. To serve
        a patch, declare it (serving.patches, ``expertpool publish``)."""
        return await self.engine.load_patch(domain, patch_dir)

    async def __del__(self):
        """Serve calls this once the replica has drained (its in-flight requests finished, or
        serving.graceful_shutdown_timeout_s passed): stop the engine and its actor group. A replica whose
        constructor failed has no engine: nothing to stop (its error was already reported)."""
        shutdown = getattr(getattr(self, "engine", None), "shutdown", None)
        if shutdown is not None:
            await shutdown()
        logger.info("replica stopped")


def build_app_from_config(cfg: ClusterConfig, engine_factory: Factory | None = None,
                          tokenizer_factory: Factory | None = None) -> Application:
    """The Serve application for ``cfg``; run it with
    ``serve.run(app, name=cfg.serving.app_name, route_prefix=cfg.serving.route_prefix)``."""
    return ExpertPoolServer.options(**cfg.serve_deployment_options()).bind(
        cfg.serving_dump(), engine_factory, tokenizer_factory)


def build_app(args: dict[str, Any]) -> Application:
    """Serve ``import_path`` target: ``expertpool.platform.app:build_app``."""
    a = AppArgs.model_validate(args)
    if isinstance(a.config, str):
        cfg = load_config(a.config)
    else:
        cfg = parse_config(a.config, source="serve application args.config")
    return build_app_from_config(cfg, a.engine_factory, a.tokenizer_factory)


def local_num_cpus(cfg: ClusterConfig) -> int:
    """Logical CPUs of a Ray that ``deploy`` starts on this machine: the machine's, or as many as one
    replica's bundles need if that is more (a 2-core laptop and the default 2 actors x 1 CPU + the
    replica's 0.1). Ray's CPUs are only bookkeeping: a replica that does not fit is never scheduled,
    while one that shares the cores runs."""
    import math

    have = os.cpu_count() or 1
    need = math.ceil(sum(b.get("CPU", 0.0) for b in cfg.pool.placement_group_bundles()))
    if need > have:
        logger.info("a replica reserves %d CPUs (%d expert actors x %g + the replica's %g) and this machine has %d:"
                    " the local Ray counts %d, and the actors share the cores", need, cfg.pool.max_width,
                    cfg.pool.actor_resources.cpu, cfg.pool.replica_cpu, have, need)
    return max(have, need)


def deploy(cfg: ClusterConfig, *, address: str | None = None, timeout_s: float = 600.0) -> str:
    """Check ``cfg`` against the model, start a local Ray (or join the one at ``address``), start Serve,
    deploy the application from its Serve config (declaratively; other declared applications stay)
    and wait until it runs. Returns the base URL. Raises ConfigError before anything starts."""
    import ray

    from expertpool.model.args import ModelArgs
    from expertpool.model.embedded import ensure_embedded_model

    source = cfg.model.path or ensure_embedded_model()  # create the embedded model once, before replicas
    model_args = ModelArgs.from_dir(storage.resolve_model(source, weights=False))
    cfg.validate_against_model(model_args)
    if not ray.is_initialized():
        from expertpool.platform.proxy import orphaned_haproxies, set_proxy_env

        set_proxy_env(cfg.serving.ingress)  # applies when this call starts the Ray instance (platform/proxy.py)
        if address in (None, "local"):
            orphans = orphaned_haproxies() if cfg.serving.ingress == "haproxy" else []
            if orphans:
                logger.warning("HAProxy processes left by a Ray that was force-stopped (pids %s) hold their "
                               "ports, and a new HAProxy may fail to start; stop them: kill %s",
                               orphans, " ".join(map(str, orphans)))
            # no address: a Ray of its own, as documented; Ray's own default would join whatever cluster
            # /tmp/ray/ray_current_cluster names, and wait forever on one that has died
            ray.init(address="local", include_dashboard=False, num_cpus=local_num_cpus(cfg))
        else:
            ray.init(address=address, include_dashboard=False)  # its replicas check its ingress
    s = cfg.serving
    t0 = time.time()
    apply_app(cfg.serve_app_config(), http_options={"host": s.host, "port": s.port})
    wait_running(s.app_name, timeout_s)
    url = f"http://{s.host}:{s.port}{s.route_prefix.rstrip('/')}"
    logger.info("deployed %s in %.1fs", s.app_name, time.time() - t0)
    return url
