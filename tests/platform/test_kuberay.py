"""KubeRay manifests: sized from the pool and the autoscaling bounds, and valid against the KubeRay v1 CRD
OpenAPI schemas copied in ``shared/kuberay-crds`` (structure and types; CEL rules are not run)."""

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

import expertpool  # noqa: F401
from expertpool.platform.config import ConfigError, load_config, parse_config
from expertpool.platform.kuberay import (
    POOL_GROUP,
    TRAIN_GROUP,
    manifests,
    raycluster_manifest,
    rayjob_manifest,
    rayservice_manifest,
)

REPO = Path(__file__).parents[2]
CRD_DIR = REPO.parent / "shared" / "kuberay-crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}


@pytest.fixture(scope="module")
def validators() -> dict[str, jsonschema.protocols.Validator]:
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {CRD_DIR} (the shared/ checkout beside the repo)")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~1 MB each; the C loader is ~10x faster
    out = {}
    for kind, filename in CRD_FILES.items():
        crd = yaml.load((CRD_DIR / filename).read_text(), Loader=loader)
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = v1["schema"]["openAPIV3Schema"]
        jsonschema.Draft7Validator.check_schema(schema)
        out[kind] = jsonschema.Draft7Validator(schema)
    return out


def _check(validators, manifest: dict) -> None:
    assert manifest["apiVersion"] == "ray.io/v1"
    errors = sorted(validators[manifest["kind"]].iter_errors(manifest), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)


@pytest.fixture(scope="module")
def cfg():
    return load_config(REPO / "cluster.yaml")


def _groups(cluster_spec: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in cluster_spec["workerGroupSpecs"]}


def test_rayservice_valid_and_sized(validators, cfg):
    manifest = rayservice_manifest(cfg)
    _check(validators, manifest)
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    pool = _groups(cluster)[POOL_GROUP]
    assert (pool["minReplicas"], pool["maxReplicas"]) == (1, 2)  # autoscaling bounds, one pod per replica (PACK)
    limits = pool["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["cpu"] == "2"  # ceil(0.1 replica + 2 actors x 0.5)
    train = _groups(cluster)[TRAIN_GROUP]
    assert (train["minReplicas"], train["maxReplicas"]) == (0, 2)
    serve = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert serve == cfg.serve_config(host="0.0.0.0")
    assert serve["http_options"]["host"] == "0.0.0.0"


def test_serve_config_v2_is_a_valid_ray_serve_config(cfg):
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(yaml.safe_load(rayservice_manifest(cfg)["spec"]["serveConfigV2"]))


def test_raycluster_valid(validators, cfg):
    manifest = raycluster_manifest(cfg)
    _check(validators, manifest)
    assert manifest["spec"]["autoscalerOptions"]["version"] == "v2"


def test_rayjob_own_cluster(validators, cfg):
    manifest = rayjob_manifest(cfg, "demo")
    _check(validators, manifest)
    spec = manifest["spec"]
    assert spec["entrypoint"] == "python -m expertpool.jobs.finetune --config cluster.yaml --job demo"
    assert "rayClusterSpec" in spec and "rayClusterConfig" not in spec  # RayJob's field name differs from RayService
    train = _groups(spec["rayClusterSpec"])[TRAIN_GROUP]
    assert train["minReplicas"] == train["maxReplicas"] == cfg.get_job("demo").workers
    assert spec["shutdownAfterJobFinishes"] is True


def test_elastic_rayjob_keeps_running_on_min_workers(validators, cfg):
    elastic = copy.deepcopy(cfg)
    job = elastic.get_job("demo")
    job.workers, job.min_workers = 4, 1
    manifest = rayjob_manifest(elastic, "demo")
    _check(validators, manifest)
    train = _groups(manifest["spec"]["rayClusterSpec"])[TRAIN_GROUP]
    assert (train["minReplicas"], train["maxReplicas"], train["replicas"]) == (1, 4, 4)


def test_rayjob_on_existing_cluster(validators, cfg):
    manifest = rayjob_manifest(cfg, "demo", cluster_name="expertpool")
    _check(validators, manifest)
    assert manifest["spec"]["clusterSelector"] == {"ray.io/cluster": "expertpool"}
    assert "rayClusterSpec" not in manifest["spec"]


def test_rayjob_unknown_job(cfg):
    with pytest.raises(ConfigError, match=r"no job named 'nope' \(known: demo\)"):
        rayjob_manifest(cfg, "nope")


@pytest.mark.parametrize("strategy,pods_per_replica", [("PACK", 1), ("STRICT_PACK", 1), ("SPREAD", 4),
                                                        ("STRICT_SPREAD", 5)])
def test_pool_group_follows_strategy(validators, cfg, strategy, pods_per_replica):
    data = cfg.model_dump(mode="json")
    data["pool"].update(actors_per_replica=4, placement_strategy=strategy,
                        actor_resources={"cpu": 4, "gpu": 1, "memory_gb": 32, "custom": {"H100": 1}})
    data["pool"]["backend"] = "nccl"
    data["serving"]["autoscaling"].update(min_replicas=1, max_replicas=3)
    gpu_cfg = parse_config(data)
    manifest = rayservice_manifest(gpu_cfg)
    _check(validators, manifest)
    pool = _groups(manifest["spec"]["rayClusterConfig"])[POOL_GROUP]
    assert (pool["minReplicas"], pool["maxReplicas"]) == (pods_per_replica, 3 * pods_per_replica)
    limits = pool["template"]["spec"]["containers"][0]["resources"]["limits"]
    actors_per_pod = 4 if pods_per_replica == 1 else 1
    assert limits["nvidia.com/gpu"] == str(actors_per_pod)
    assert int(pool["rayStartParams"]["memory"]) == actors_per_pod * 32 * 2**30
    assert int(limits["memory"].removesuffix("Gi")) > actors_per_pod * 32  # object store and raylet headroom
    assert '\\"H100\\": ' in pool["rayStartParams"]["resources"]


def test_api_key_goes_through_a_secret(validators, cfg):
    data = cfg.model_dump(mode="json")
    data["serving"]["api_key"] = "plain-text"
    with pytest.raises(ConfigError, match=r"serving\.api_key: .*kubernetes\.api_key_secret"):
        rayservice_manifest(parse_config(data))
    data["serving"]["api_key"] = None
    data["kubernetes"]["api_key_secret"] = "expertpool-api-key"
    manifest = rayservice_manifest(parse_config(data))
    _check(validators, manifest)
    env = {e["name"]: e for e in
           manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["EXPERTPOOL_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "expertpool-api-key", "key": "api-key"}


def test_every_pod_loads_the_openai_error_middleware_into_serves_proxy(cfg):
    from expertpool.platform.proxy import PROXY_CALLBACK, PROXY_CALLBACK_ENV
    spec = rayservice_manifest(cfg)["spec"]["rayClusterConfig"]
    pods = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    for pod in pods:
        for c in pod["template"]["spec"]["containers"]:
            assert {"name": PROXY_CALLBACK_ENV, "value": PROXY_CALLBACK} in c["env"], c


def test_schema_check_catches_a_broken_manifest(validators, cfg):
    manifest = copy.deepcopy(raycluster_manifest(cfg))
    del manifest["spec"]["workerGroupSpecs"][0]["minReplicas"]
    manifest["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "two"
    errors = list(validators["RayCluster"].iter_errors(manifest))
    assert len(errors) == 2


def test_manifests_writes_all(validators, cfg, tmp_path):
    paths = manifests(cfg, tmp_path / "k8s")
    names = sorted(p.name for p in paths)
    assert names == ["raycluster.yaml", "rayjob-demo.yaml", "rayservice.yaml", "serve_config.yaml"]
    for path in paths:
        doc = yaml.safe_load(path.read_text())
        if path.name != "serve_config.yaml":
            _check(validators, doc)
    job = yaml.safe_load((tmp_path / "k8s" / "rayjob-demo.yaml").read_text())
    # demo publishes into the app, so it must run on the cluster that serves it
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cfg.kubernetes.name}
