"""KubeRay manifests (apiVersion ray.io/v1) derived from a :class:`ClusterConfig`.

``rayservice_manifest(cfg)`` serves the app on an autoscaling cluster (``serveConfigV2`` is
``cfg.serve_config()``: model, pool and serving only, so editing a training job leaves it byte-identical,
and the published patches in the deployment's user_config); ``raycluster_manifest(cfg)`` is the same
cluster without Serve management, for ``serve deploy`` plus ``ray job submit``; ``rayjob_manifest(cfg,
job)`` runs one fine-tuning job, on its own cluster or, with ``cluster_name``, on an existing RayCluster
(required when the job publishes into a running app). A RayJob carries its own config (model and that
one job) in its runtime environment, so the image holds only code, and its output goes to the job's
resolved output_dir (an s3:// / gs:// URI or shared storage outlives the job's cluster).

``manifests(cfg, out_dir)`` writes them so that ``kubectl apply -f`` on any directory it writes is safe:
one directory per deployment choice, holding Kubernetes objects only (``rayservice/``; ``raycluster/``
with the jobs that publish into it; ``rayjobs/`` with the jobs on clusters of their own), and the Serve
configs for ``serve deploy`` apart in ``serve-config/`` (``raycluster.yaml`` binds 0.0.0.0 so the head
service reaches the proxy; ``local.yaml`` binds serving.host).

Every pod template gets ``kubernetes.pod_template`` deep-merged into it (``deep_merge``): tolerations,
volumes, service account, image pull secrets, annotations, env from Secrets; ``kubernetes.
hf_token_secret`` becomes env ``HF_TOKEN`` in every container.

Sizing is derived, not configured. Serve autoscales whole replicas; each replica asks for one placement
group (``cfg.pool.placement_group_bundles()``), and the Ray autoscaler adds pods until the group fits.
So the pool worker pod is shaped after the placement strategy: PACK/STRICT_PACK = one pod holds a whole
replica (replica bundle + all actor bundles); SPREAD = one pod per actor, each with room for the
replica bundle; STRICT_SPREAD = one pod per bundle. Its minReplicas/maxReplicas are the Serve
autoscaling bounds times pods per replica. Train workers get a separate group (one pod per worker,
0..max workers, scaled on demand). CPUs and GPUs are rounded up to whole units per pod; pod memory is
the Ray memory reservation plus object-store headroom, or ``memory_per_cpu_gb`` per CPU when no
reservation is set. The head runs no replicas or actors (``num-cpus: 0``).

Not here: Ingress/Gateway objects, GCS fault tolerance (Redis), image builds. The generated objects
are checked in tests against the KubeRay CRD schemas in ``shared/kuberay-crds``.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import yaml

from expertpool.model import storage
from expertpool.platform.config import API_KEY_ENV, GIB, HF_TOKEN_KEY, ClusterConfig, ConfigError, ConfigProblem
from expertpool.platform.proxy import ingress_env

API_VERSION = "ray.io/v1"
POOL_GROUP = "pool"
TRAIN_GROUP = "train"
OBJECT_STORE_FRACTION = 0.3  # Ray's default object store share of node memory: pods get this on top
RAY_OVERHEAD_GB = 1.0  # raylet, dashboard agent, Python workers' baseline, per pod
GPU_RESOURCE = "nvidia.com/gpu"
RAY_CONTAINER = "ray"  # the name a pod_template container takes to apply to every pod's Ray container
CONFIG_ENV = "EXPERTPOOL_CONFIG"  # a RayJob's config, in its runtime environment


def finetune_entrypoint(job_name: str, config: str = "cluster.yaml") -> str:
    return f"python -m expertpool.jobs.finetune --config {config} --job {job_name}"


def deep_merge(base: Any, overlay: Any) -> Any:
    """``overlay`` merged into ``base`` (neither changed): mappings key by key; lists whose entries are all
    mappings with a ``name`` merge entry by entry on it (containers, env, volumes, volumeMounts, ports);
    other lists are appended (tolerations, imagePullSecrets); anything else is replaced."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        out = dict(base)
        for k, v in overlay.items():
            out[k] = deep_merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(overlay, list):
        if all(isinstance(x, dict) and "name" in x for x in base + overlay):
            out = list(base)
            index = {x["name"]: i for i, x in enumerate(out)}
            for item in overlay:
                if item["name"] in index:
                    out[index[item["name"]]] = deep_merge(out[index[item["name"]]], item)
                else:
                    out.append(copy.deepcopy(item))
            return out
        return base + copy.deepcopy(overlay)
    return copy.deepcopy(overlay)


def _pod_template(cfg: ClusterConfig, spec: dict[str, Any]) -> dict[str, Any]:
    """A pod template: our labels and ``spec`` with kubernetes.pod_template merged in; its container
    named ``ray`` goes into this pod's Ray container."""
    overlay = copy.deepcopy(cfg.kubernetes.pod_template)
    ray_name = spec["containers"][0]["name"]
    for c in overlay.get("spec", {}).get("containers", []):
        if c.get("name") == RAY_CONTAINER:
            c["name"] = ray_name
    return deep_merge({"metadata": {"labels": _labels(cfg)}, "spec": spec}, overlay)


# --- pods ---------------------------------------------------------------------------------------------


def _sum(*bundles: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _max(*bundles: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            out[k] = max(out.get(k, 0.0), v)
    return out


def pool_pod(cfg: ClusterConfig) -> tuple[dict[str, float], int]:
    """(Ray resources one pool pod must offer, pods per replica), from the placement strategy."""
    bundles = cfg.pool.placement_group_bundles()
    replica, actors = bundles[0], bundles[1:]
    strategy = cfg.pool.placement_strategy
    if strategy in ("PACK", "STRICT_PACK"):
        return _sum(*bundles), 1
    if strategy == "SPREAD":
        return _sum(replica, actors[0]), len(actors)
    return _max(*bundles), len(bundles)  # STRICT_SPREAD: every bundle on its own node


def _container(cfg: ClusterConfig, name: str, resources: dict[str, Any], ports: list[dict[str, Any]]) -> dict:
    k8s = cfg.kubernetes
    container: dict[str, Any] = {
        "name": name,
        "image": k8s.image,
        "imagePullPolicy": k8s.image_pull_policy,
        "resources": {"limits": dict(resources), "requests": dict(resources)},
        "ports": ports,
    }
    # Serve's proxy (or, with the HAProxy ingress, the replica's own HTTP server) answers some errors
    # itself (back-pressure 503s): the middleware makes them OpenAI JSON. serving.ingress is a setting
    # of every Ray process, so every pod carries it.
    container["env"] = [{"name": k, "value": v} for k, v in ingress_env(cfg.serving.ingress).items()]
    if k8s.api_key_secret:
        container["env"].append({"name": API_KEY_ENV,
                                 "valueFrom": {"secretKeyRef": {"name": k8s.api_key_secret, "key": "api-key"}}})
    if k8s.hf_token_secret:  # huggingface_hub reads HF_TOKEN: gated and private model repos
        container["env"].append({"name": "HF_TOKEN",
                                 "valueFrom": {"secretKeyRef": {"name": k8s.hf_token_secret, "key": HF_TOKEN_KEY}}})
    return container


def _worker_group(cfg: ClusterConfig, group: str, ray_resources: dict[str, float], min_replicas: int,
                  max_replicas: int, replicas: int) -> dict[str, Any]:
    cpu = max(1, math.ceil(ray_resources.get("CPU", 0.0) - 1e-9))
    gpu = math.ceil(ray_resources.get("GPU", 0.0) - 1e-9)
    start_params: dict[str, str] = {}
    reserved = ray_resources.get("memory")
    if reserved:
        start_params["memory"] = str(int(reserved))  # exactly what the bundles reserve; the rest is headroom
        memory_gb = math.ceil(reserved / GIB / (1 - OBJECT_STORE_FRACTION) + RAY_OVERHEAD_GB)
    else:
        memory_gb = math.ceil(cfg.kubernetes.memory_per_cpu_gb * cpu)
    custom = {k: v for k, v in ray_resources.items() if k not in ("CPU", "GPU", "memory")}
    if custom:
        # ray start --resources takes JSON; KubeRay passes the value through a shell, hence the outer quotes
        start_params["resources"] = '"' + json.dumps(custom).replace('"', '\\"') + '"'
    limits: dict[str, Any] = {"cpu": str(cpu), "memory": f"{memory_gb}Gi"}
    if gpu:
        limits[GPU_RESOURCE] = str(gpu)
    pod_spec: dict[str, Any] = {"containers": [_container(cfg, "ray-worker", limits, [
        {"containerPort": cfg.serving.port, "name": "serve"}])]}
    if cfg.kubernetes.node_selector:
        pod_spec["nodeSelector"] = dict(cfg.kubernetes.node_selector)
    return {
        "groupName": group,
        "replicas": replicas,
        "minReplicas": min_replicas,
        "maxReplicas": max_replicas,
        "rayStartParams": start_params,
        "template": _pod_template(cfg, pod_spec),
    }


def _head_group(cfg: ClusterConfig) -> dict[str, Any]:
    head = cfg.kubernetes.head
    limits = {"cpu": str(max(1, math.ceil(head.cpu - 1e-9))), "memory": f"{math.ceil(head.memory_gb)}Gi"}
    ports = [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
             {"containerPort": 10001, "name": "client"}, {"containerPort": cfg.serving.port, "name": "serve"}]
    return {
        "serviceType": cfg.kubernetes.service_type,
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "template": _pod_template(cfg, {"containers": [_container(cfg, "ray-head", limits, ports)]}),
    }


def _labels(cfg: ClusterConfig) -> dict[str, str]:
    return {"app.kubernetes.io/name": "expertpool", "app.kubernetes.io/instance": str(cfg.kubernetes.name)}


def _pool_group(cfg: ClusterConfig) -> dict[str, Any]:
    pod, per_replica = pool_pod(cfg)
    scaling = cfg.serving.autoscaling
    initial = scaling.initial_replicas if scaling.initial_replicas is not None else scaling.min_replicas
    return _worker_group(cfg, POOL_GROUP, pod, scaling.min_replicas * per_replica,
                         scaling.max_replicas * per_replica, initial * per_replica)


def _train_group(cfg: ClusterConfig) -> dict[str, Any] | None:
    """On-demand group for any job of cfg: 0 pods idle, up to the largest job's worker count."""
    jobs = list(cfg.train.jobs.values())
    if not jobs:
        return None
    pod = _max(*(job.worker_resources.bundle() for job in jobs))
    return _worker_group(cfg, TRAIN_GROUP, pod, 0, max(job.workers for job in jobs), 0)


def _cluster_spec(cfg: ClusterConfig, worker_groups: list[dict[str, Any]]) -> dict[str, Any]:
    k8s = cfg.kubernetes
    return {
        "rayVersion": k8s.ray_version,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"version": "v2", "upscalingMode": k8s.upscaling_mode,
                              "idleTimeoutSeconds": k8s.idle_timeout_s},
        "headGroupSpec": _head_group(cfg),
        "workerGroupSpecs": worker_groups,
    }


def _metadata(cfg: ClusterConfig, name: str) -> dict[str, Any]:
    return {"name": name, "namespace": cfg.kubernetes.namespace, "labels": _labels(cfg)}


def _refuse_inline_secret(cfg: ClusterConfig) -> None:
    if cfg.serving.api_key:
        raise ConfigError([ConfigProblem("serving.api_key", "is set in the file, and manifests would carry it in "
                                         "plain text; put it in a Kubernetes Secret (key api-key), set "
                                         "kubernetes.api_key_secret to its name and remove serving.api_key")],
                          cfg.source)


# --- manifests ----------------------------------------------------------------------------------------


def raycluster_manifest(cfg: ClusterConfig) -> dict[str, Any]:
    """A long-lived autoscaling RayCluster: pool group (+ train group if jobs exist). Deploy the app with
    ``serve deploy`` and run jobs with ``ray job submit`` or :func:`rayjob_manifest` ``(cluster_name=...)``."""
    _refuse_inline_secret(cfg)
    groups = [g for g in (_pool_group(cfg), _train_group(cfg)) if g is not None]
    return {"apiVersion": API_VERSION, "kind": "RayCluster", "metadata": _metadata(cfg, str(cfg.kubernetes.name)),
            "spec": _cluster_spec(cfg, groups)}


def rayservice_manifest(cfg: ClusterConfig, import_path: str | None = None) -> dict[str, Any]:
    """A RayService serving ``cfg.serve_config()`` on the same autoscaling cluster as raycluster_manifest."""
    _refuse_inline_secret(cfg)
    serve = cfg.serve_config(import_path, host="0.0.0.0") if import_path else cfg.serve_config(host="0.0.0.0")
    groups = [g for g in (_pool_group(cfg), _train_group(cfg)) if g is not None]
    return {
        "apiVersion": API_VERSION,
        "kind": "RayService",
        "metadata": _metadata(cfg, str(cfg.kubernetes.name)),
        "spec": {"serveConfigV2": dump_yaml(serve), "rayClusterConfig": _cluster_spec(cfg, groups)},
    }


def job_config(cfg: ClusterConfig, job_name: str) -> dict[str, Any]:
    """What a RayJob of ``job_name`` reads: model, serving.app_name (its publish_to target) and train with
    this job only, so an edit to another job or to the Kubernetes settings leaves that RayJob unchanged."""
    data = cfg.model_dump(mode="json", include={"model", "train"})
    data["serving"] = {"app_name": cfg.serving.app_name}
    data["train"]["jobs"] = {job_name: data["train"]["jobs"][job_name]}
    return data


def _mount_paths(cfg: ClusterConfig) -> list[str]:
    containers = cfg.kubernetes.pod_template.get("spec", {}).get("containers", [])
    return [m["mountPath"].rstrip("/") for c in containers if c.get("name") == RAY_CONTAINER
            for m in c.get("volumeMounts", []) if "mountPath" in m]


def _refuse_pod_local_output(cfg: ClusterConfig, job_name: str) -> None:
    """A RayJob's pods (and a RayCluster's, on restart) lose their files: the job's outputs must go to
    object storage, or to a volume mounted through kubernetes.pod_template."""
    location = cfg.train.output_location(job_name, expand_home=False)  # `~` is the pod's home there
    mounted = any(location == m or location.startswith(m + "/") for m in _mount_paths(cfg))
    if mounted or storage.is_remote(location, hub=False):
        return
    raise ConfigError([ConfigProblem(f"train.jobs.{job_name}.output_dir", f"'{location}' is inside the pod, and the "
                                     "RayJob's cluster is deleted after the job (a head restart loses it too); set "
                                     "train.storage_path (or output_dir) to an s3:// or gs:// URI, or mount a "
                                     "volume there with a `ray` container in kubernetes.pod_template")], cfg.source)


def rayjob_manifest(cfg: ClusterConfig, job_name: str, *, cluster_name: str | None = None) -> dict[str, Any]:
    """A RayJob running ``python -m expertpool.jobs.finetune --config env:EXPERTPOOL_CONFIG --job NAME``,
    its config (``job_config``) in the runtime environment.

    Without ``cluster_name`` the job gets its own autoscaling cluster (head + one pod per worker), deleted
    when the job finishes. With it, the job runs on that existing RayCluster (``clusterSelector``), which
    is how a ``publish_to`` job reaches the app it hot-swaps into."""
    _refuse_inline_secret(cfg)
    job = cfg.get_job(job_name)
    _refuse_pod_local_output(cfg, job_name)
    runtime_env = {"env_vars": {CONFIG_ENV: dump_yaml(job_config(cfg, job_name))}}
    spec: dict[str, Any] = {"entrypoint": finetune_entrypoint(job_name, f"env:{CONFIG_ENV}"),
                            "runtimeEnvYAML": dump_yaml(runtime_env)}
    if cluster_name is not None:
        spec["clusterSelector"] = {"ray.io/cluster": cluster_name}
    else:
        low, high = job.worker_range  # elastic jobs keep running on min_workers pods
        group = _worker_group(cfg, TRAIN_GROUP, job.worker_resources.bundle(), low, high, high)
        spec.update({
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "backoffLimit": 0,  # Ray Train already restarts workers (max_failures); a resubmit resumes from output_dir
            "rayClusterSpec": _cluster_spec(cfg, [group]),
        })
    return {"apiVersion": API_VERSION, "kind": "RayJob",
            "metadata": _metadata(cfg, f"{cfg.kubernetes.name}-{job_name}"[:63].rstrip("-")), "spec": spec}


KINDS = ("rayservice", "raycluster", "rayjobs", "serve-config")


def manifests(cfg: ClusterConfig, out_dir: str | Path, *, kinds: tuple[str, ...] = KINDS) -> list[Path]:
    """Write the manifests of ``kinds`` under ``out_dir``, one directory each (see the module docstring);
    return the paths. A directory is emptied of the YAML files an earlier run wrote there first, so a
    removed job's RayJob does not linger. Jobs with ``publish_to`` go with the RayCluster (they must
    run where the app runs); the others get clusters of their own in ``rayjobs/``."""
    out = Path(out_dir)
    docs: dict[str, dict[str, Any]] = {}
    if "rayservice" in kinds:
        docs["rayservice/rayservice.yaml"] = rayservice_manifest(cfg)
    if "raycluster" in kinds:
        docs["raycluster/raycluster.yaml"] = raycluster_manifest(cfg)
    for name, job in cfg.train.jobs.items():
        if job.publish_to and "raycluster" in kinds:
            docs[f"raycluster/rayjob-{name}.yaml"] = rayjob_manifest(cfg, name, cluster_name=str(cfg.kubernetes.name))
        elif not job.publish_to and "rayjobs" in kinds:
            docs[f"rayjobs/rayjob-{name}.yaml"] = rayjob_manifest(cfg, name)
    if "serve-config" in kinds:
        docs["serve-config/raycluster.yaml"] = cfg.serve_config(host="0.0.0.0")
        docs["serve-config/local.yaml"] = cfg.serve_config()
    for kind in kinds:
        for old in (out / kind).glob("*.yaml"):
            old.unlink()
    paths = []
    for filename, doc in docs.items():
        path = out / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dump_yaml(doc), encoding="utf-8")
        paths.append(path)
    return paths


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (serveConfigV2) as literal blocks so the manifest stays readable."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)


def dump_yaml(doc: Any) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False)
