"""Hot-swapping fine-tuned expert patches into running Serve replicas, without a restart.

A detached named actor per Serve app (``PatchRegistry``) is the source of truth: ``publish`` records
``domain -> patch_dir`` there, and every replica runs ``watch_patches``, which loads each new patch
into its engine as variant ``BASE:DOMAIN`` between engine steps and acknowledges it. Replicas that
start later (autoscaling, restarts) load every registered patch on start, so all replicas converge.
``publish`` returns once every running replica of the app has acknowledged (or raises on timeout).
"""

import asyncio
import logging
import time

import ray

log = logging.getLogger(__name__)

NAMESPACE = "expertpool"
POLL_S = 1.0


@ray.remote(num_cpus=0)
class PatchRegistry:
    def __init__(self):
        self.patches: dict[str, str] = {}
        self.acks: dict[str, dict[str, str]] = {}   # replica id -> {domain: model id}
        self.errors: dict[str, dict[str, str]] = {}  # replica id -> {domain: error}

    def publish(self, domain: str, patch_dir: str) -> None:
        self.patches[domain] = patch_dir

    def list(self) -> dict[str, str]:
        return dict(self.patches)

    def ack(self, replica_id: str, domain: str, model_id: str | None, error: str | None = None) -> None:
        if error is None:
            self.acks.setdefault(replica_id, {})[domain] = model_id
        else:
            self.errors.setdefault(replica_id, {})[domain] = error

    def status(self) -> tuple[dict, dict]:
        return self.acks, self.errors


def registry(app_name: str):
    return PatchRegistry.options(name=f"patches:{app_name}", namespace=NAMESPACE, lifetime="detached",
                                 get_if_exists=True).remote()


async def watch_patches(engine, app_name: str, replica_id: str) -> None:
    """Replica side: poll the registry and load new patches into ``engine`` (runs until cancelled)."""
    reg = registry(app_name)
    done: set[str] = set()
    while True:
        try:
            patches = await reg.list.remote()
            for domain, patch_dir in patches.items():
                if domain in done:
                    continue
                try:
                    model_id = await engine.load_patch(domain, patch_dir)
                    await reg.ack.remote(replica_id, domain, model_id)
                    log.info("replica %s now serves %s", replica_id, model_id)
                except Exception as e:  # a bad patch must not take the replica down: report it to publish
                    log.error("replica %s could not load patch %s from %s: %s", replica_id, domain, patch_dir, e)
                    await reg.ack.remote(replica_id, domain, None, f"{type(e).__name__}: {e}")
                done.add(domain)
        except ray.exceptions.RayError as e:
            log.warning("patch registry unreachable (%s); retrying", e)
        await asyncio.sleep(POLL_S)


class AppNotRunning(LookupError):
    """The Serve application to publish into is not running on this Ray cluster."""


def _running_replicas(app_name: str) -> int:
    from ray import serve
    from ray.serve.exceptions import RayServeException
    try:
        app = serve.status().applications.get(app_name)
    except RayServeException:  # Serve itself is not running on this cluster
        app = None
    n = 0 if app is None else sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())
    if n == 0:
        raise AppNotRunning(f"no running Serve application named {app_name!r} on this Ray cluster; start it with "
                            "`expertpool serve` (or check `serve status` and --app)")
    return n


def publish(app_name: str, patch_dir: str, domain: str | None = None, timeout_s: float = 300.0) -> str:
    """Make every replica of ``app_name`` serve the patch; returns the served model id."""
    from expertpool.model.patch import read_patch
    patch = read_patch(patch_dir)  # validate before anything is published
    domain = domain or patch.domain
    n = _running_replicas(app_name)
    reg = registry(app_name)
    ray.get(reg.publish.remote(domain, str(patch_dir)))
    t0 = time.time()
    while True:
        acks, errors = ray.get(reg.status.remote())
        failed = {r: e[domain] for r, e in errors.items() if domain in e}
        if failed:
            raise RuntimeError(f"patch {domain!r} failed to load on {len(failed)} replica(s): {failed}")
        ok = [a[domain] for a in acks.values() if domain in a]
        if len(ok) >= n:
            log.info("patch %s live on %d replica(s) as %s in %.1fs", domain, n, ok[0], time.time() - t0)
            return ok[0]
        if time.time() - t0 > timeout_s:
            raise TimeoutError(f"patch {domain!r}: {len(ok)} of {n} replicas loaded it within {timeout_s:.0f}s")
        time.sleep(0.5)
