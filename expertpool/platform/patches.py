"""Published ESFT patches and the group width: declared in the Serve deployment's ``user_config``,
applied by ``reconfigure``. (``actors``, set by ``scale``/``expertpool scale``, resizes every replica's
expert-parallel group the same way; see ``apply_width``.)

The declaration is ``{"patches": {domain: location}}`` in the user_config of the ``ExpertPool``
deployment (``serving.patches`` in cluster.yaml, hence in the Serve config and the RayService's
``serveConfigV2``). Serve hands it to every replica's ``reconfigure``: when the replica starts and
whenever it changes, without restarting the replica (the application's code version covers its
import path and args, not user_config). A replica loads each declared patch it does not serve yet
(``PatchSet``) into its engine as ``<model>:<domain>``, between engine steps, so running requests are
unaffected; a replica that starts later (autoscaling, a restart, a head-node restart, a RayService
upgrade) loads the declared patches before it takes traffic. The declaration is the state: nothing
lives in a detached actor.

``publish(app, location, domain)`` is the convenience for a running app: it validates the patch, adds
it to the deployment's user_config by re-applying the application's declarative config (what ``serve
deploy`` would do with the edited file) and returns once every running replica serves it, or raises
with the replicas' errors. It needs an app deployed from a Serve config (``expertpool serve``, ``serve
deploy``, a RayService): an app started with ``serve.run`` has no declarative config to edit. On a
RayService, KubeRay re-applies its ``serveConfigV2`` after a head restart or an upgrade, so there the
lasting declaration is ``serving.patches`` in cluster.yaml, applied with the regenerated manifests.

A patch that fails to load on a replica does not take the replica down: it is logged, kept in the
replica's ``patch_errors`` (``stats``) and raised by ``publish``. Removing a patch from the
declaration stops new replicas from loading it; running ones keep serving it until they restart.

Relies on Ray Serve's controller client (``ray.serve.context._get_global_client``, as Serve's own
``serve run`` CLI does) to read and apply declarative configs; pinned Ray 2.60.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from expertpool.errors import UserError
from expertpool.platform.config import DEPLOYMENT_NAME

log = logging.getLogger(__name__)


class UserConfig(BaseModel):
    """The ``user_config`` of the ExpertPool deployment."""

    model_config = ConfigDict(extra="forbid")
    patches: dict[str, str] = Field(default_factory=dict, description="domain -> patch location")
    actors: int | None = Field(None, ge=1, description="Expert-parallel actors of every replica's group "
                               "(``expertpool scale``), within pool.actors_per_replica's range; None = as "
                               "the replica started.")


async def apply_width(engine, user_config: dict[str, Any] | None) -> str | None:
    """Resize the replica's group to the declared ``actors`` (``reconfigure``); the error, if any, is
    returned (kept in the replica's stats; ``scale`` reports it), never raised: a width the range
    does not allow must not take the replica down."""
    actors = UserConfig.model_validate(user_config or {}).actors
    resize = getattr(engine, "resize", None)
    if actors is None or resize is None:
        return None
    try:
        await resize(actors)
        return None
    except Exception as e:
        log.error("could not resize the expert group to %d actors: %s", actors, e)
        return f"{type(e).__name__}: {e}"


class PatchSet:
    """A replica's view of the declaration: what it serves, and what failed to load."""

    def __init__(self):
        self.loaded: dict[str, str] = {}   # domain -> location it was loaded from
        self.model_ids: dict[str, str] = {}
        self.errors: dict[str, str] = {}

    async def apply(self, engine, user_config: dict[str, Any] | None) -> None:
        """Load every declared patch not served yet (``reconfigure``). Raises only for a malformed
        user_config; a patch that fails to load is logged and kept in ``errors``."""
        declared = UserConfig.model_validate(user_config or {}).patches
        for domain, where in declared.items():
            if self.loaded.get(domain) == where:
                continue
            if domain in self.loaded:
                self.errors[domain] = (f"domain {domain!r} already serves {self.loaded[domain]}; publish {where} "
                                       "under another domain, or redeploy the app to replace it")
                log.error("patch %s: %s", domain, self.errors[domain])
                continue
            try:
                self.model_ids[domain] = await engine.load_patch(domain, where)
            except Exception as e:  # a bad patch must not take the replica down: publish reports it
                self.errors[domain] = f"{type(e).__name__}: {e}"
                log.error("could not load patch %s from %s: %s", domain, where, self.errors[domain])
                continue
            self.loaded[domain] = where
            self.errors.pop(domain, None)
            log.info("serving %s from %s", self.model_ids[domain], where)
        for domain in sorted(set(self.loaded) - set(declared)):
            log.warning("patch %s is no longer declared; this replica serves it until it restarts", domain)

    def stats(self) -> dict[str, Any]:
        return {"patches": dict(self.model_ids), "patch_sources": dict(self.loaded), "patch_errors": dict(self.errors)}


# ---------------------------------------------------------------------------------------------- applying

class AppNotRunning(UserError, LookupError):
    """The Serve application to publish into is not running on this Ray cluster."""


class AppNotDeclared(AppNotRunning):
    """The application runs, but from ``serve.run``: it has no declarative config whose user_config could
    change in place."""


def _client():
    from ray.serve.context import _get_global_client
    from ray.serve.exceptions import RayServeException

    try:
        return _get_global_client()
    except RayServeException as e:
        raise AppNotRunning(f"Serve is not running on this Ray cluster ({e}); start the app with "
                            "`expertpool serve` or `serve deploy`") from e


def apply_app(app_config: dict[str, Any], *, http_options: dict[str, Any] | None = None) -> None:
    """Deploy (or update) one application from its Serve-config entry, declaratively, keeping every
    other declaratively deployed application as it is (Serve's declarative apply replaces the whole
    set). Starts Serve with ``http_options`` if it is not running."""
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    if http_options is not None:
        serve.start(http_options=http_options)
    client = _client()
    details = client.get_serve_details()
    apps = {name: app["deployed_app_config"] for name, app in details.get("applications", {}).items()
            if app.get("source") == "declarative" and app.get("deployed_app_config")}
    if app_config["name"] in details.get("applications", {}) and app_config["name"] not in apps:
        raise AppNotDeclared(f"Serve application {app_config['name']!r} was deployed with serve.run; delete it "
                             "(serve.delete) or pick another serving.app_name before deploying it from a config")
    apps[app_config["name"]] = app_config
    config = {"applications": list(apps.values())}
    if details.get("target_capacity") is not None:
        config["target_capacity"] = details["target_capacity"]
    client.deploy_apps(ServeDeploySchema.model_validate(config))


def wait_running(app_name: str, timeout_s: float) -> None:
    """Block until the application is RUNNING; raise with its status message if it fails."""
    from ray import serve

    t0 = time.time()
    while True:
        app = serve.status().applications.get(app_name)
        status = None if app is None else str(app.status)
        if status is not None and status.endswith("RUNNING"):
            return
        if status is not None and status.endswith(("DEPLOY_FAILED", "UNHEALTHY")):
            raise RuntimeError(f"Serve application {app_name!r} is {status}: {app.message}")
        if time.time() - t0 > timeout_s:
            raise TimeoutError(f"Serve application {app_name!r} not running after {timeout_s:.0f}s (status {status})")
        time.sleep(0.5)


def declared_app(app_name: str) -> dict[str, Any]:
    """The running application's declarative config (``deployed_app_config``)."""
    details = _client().get_serve_details().get("applications", {})
    app = details.get(app_name)
    if app is None:
        raise AppNotRunning(f"no Serve application named {app_name!r} on this Ray cluster; start it with "
                            "`expertpool serve` (or check `serve status` and --app)")
    if app.get("source") != "declarative" or not app.get("deployed_app_config"):
        raise AppNotDeclared(f"Serve application {app_name!r} was deployed with serve.run, so its user_config "
                             "cannot change in place; deploy it from a Serve config (`expertpool serve`, `serve "
                             "deploy`), or add the patch to serving.patches and redeploy")
    return app["deployed_app_config"]


def _running_replicas(app_name: str) -> int:
    from ray import serve

    app = serve.status().applications.get(app_name)
    return 0 if app is None else sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())


def _user_config_entry(app: dict[str, Any]) -> dict[str, Any]:
    deployments = app.setdefault("deployments", [])
    entry = next((d for d in deployments if d.get("name") == DEPLOYMENT_NAME), None)
    if entry is None:
        entry = {"name": DEPLOYMENT_NAME}
        deployments.append(entry)
    return entry


def scale(app_name: str, actors: int, timeout_s: float = 600.0) -> int:
    """Declare ``actors`` expert-parallel actors per replica in ``app_name``'s user_config and wait
    until every running replica's group has that width (each resizes while it serves: new actors
    load, experts are re-sharded, the switch happens between steps, in-flight requests continue).
    Returns the number of replicas. Raises AppNotRunning / AppNotDeclared, RuntimeError with a
    replica's error (e.g. a width outside pool.actors_per_replica's range), TimeoutError."""
    from ray import serve

    app = declared_app(app_name)
    entry = _user_config_entry(app)
    user_config = UserConfig.model_validate(entry.get("user_config") or {})
    user_config.actors = actors
    entry["user_config"] = user_config.model_dump(exclude_none=True)
    apply_app(app)
    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name)
    t0 = time.time()
    done: set[str] = set()
    while True:
        n = _running_replicas(app_name)
        stats = handle.stats.remote().result(timeout_s=max(1.0, timeout_s - (time.time() - t0)))
        if stats.get("width_error"):
            raise RuntimeError(f"replica {stats['replica_id']} could not resize: {stats['width_error']}")
        if stats.get("width") == actors:
            done.add(stats["replica_id"])
        if n and len(done) >= n:
            log.info("%d replica(s) of %s run %d expert actors each (%.1fs)", n, app_name, actors, time.time() - t0)
            return n
        if time.time() - t0 > timeout_s:
            raise TimeoutError(f"{len(done)} of {n} replicas run {actors} actors after {timeout_s:.0f}s")
        time.sleep(0.5)


def publish(app_name: str, location: str, domain: str | None = None, timeout_s: float = 300.0) -> str:
    """Declare a patch in ``app_name``'s user_config and wait until every running replica serves it;
    returns the served model id ``<model>:<domain>``. Raises PatchError for an invalid patch,
    AppNotRunning / AppNotDeclared, RuntimeError with the replicas' errors, TimeoutError."""
    from ray import serve

    from expertpool.model.patch import read_patch

    patch = read_patch(location)  # validate (and fetch a remote one) before anything is declared
    domain = domain or patch.domain
    app = declared_app(app_name)
    entry = _user_config_entry(app)
    user_config = UserConfig.model_validate(entry.get("user_config") or {})
    user_config.patches[domain] = str(location)
    entry["user_config"] = user_config.model_dump(exclude_none=True)
    apply_app(app)
    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name)
    t0 = time.time()
    served: dict[str, str] = {}
    while True:
        n = _running_replicas(app_name)
        stats = handle.stats.remote().result(timeout_s=max(1.0, timeout_s - (time.time() - t0)))
        if domain in stats.get("patch_errors", {}):
            raise RuntimeError(f"patch {domain!r} failed to load on replica {stats['replica_id']}: "
                               f"{stats['patch_errors'][domain]}")
        if stats.get("patch_sources", {}).get(domain) == str(location):
            served[stats["replica_id"]] = stats["patches"][domain]
        if n and len(served) >= n:
            log.info("patch %s live on %d replica(s) as %s in %.1fs", domain, n, next(iter(served.values())),
                     time.time() - t0)
            return next(iter(served.values()))
        if time.time() - t0 > timeout_s:
            raise TimeoutError(f"patch {domain!r}: {len(served)} of {n} replicas serve it after {timeout_s:.0f}s")
        time.sleep(0.2)
