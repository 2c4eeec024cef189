"""KubeRay manifests: sized from the pool and the autoscaling bounds, valid against the KubeRay v1 CRD
OpenAPI schemas copied in ``shared/kuberay-crds`` (structure and types; CEL rules are not run), laid out
for ``kubectl apply -f``, and applicable with no hand edits (the DeepSeek-V3 acceptance test)."""

import copy
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

import expertpool  # noqa: F401
from expertpool.platform.config import ConfigError, load_config, parse_config
from expertpool.platform.kuberay import (
    CONFIG_ENV,
    POOL_GROUP,
    TRAIN_GROUP,
    deep_merge,
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
    """The shipped example, with its job's outputs in object storage (on Kubernetes pods are disposable)."""
    shipped = load_config(REPO / "cluster.yaml")
    return parse_config(deep_merge(shipped.model_dump(mode="json"), {"train": {"storage_path": "s3://bucket/runs"}}))


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
    assert spec["entrypoint"] == "python -m expertpool.jobs.finetune --config env:EXPERTPOOL_CONFIG --job demo"
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


@pytest.mark.parametrize("ingress", ["proxy", "haproxy"])
def test_every_pod_runs_the_declared_ingress(validators, cfg, ingress):
    """serving.ingress is a setting of every Ray process: HAProxy's switch is on every pod or on none."""
    from expertpool.platform.proxy import HAPROXY_ENV
    c = parse_config(deep_merge(cfg.model_dump(mode="json"), {"serving": {"ingress": ingress}}))
    for manifest in (rayservice_manifest(c), raycluster_manifest(c)):
        _check(validators, manifest)
        spec = manifest["spec"].get("rayClusterConfig", manifest["spec"])
        for pod in [spec["headGroupSpec"]] + spec["workerGroupSpecs"]:
            for container in pod["template"]["spec"]["containers"]:
                env = {e["name"]: e.get("value") for e in container["env"]}
                assert env.get(HAPROXY_ENV) == ("1" if ingress == "haproxy" else None), container["env"]


def test_schema_check_catches_a_broken_manifest(validators, cfg):
    manifest = copy.deepcopy(raycluster_manifest(cfg))
    del manifest["spec"]["workerGroupSpecs"][0]["minReplicas"]
    manifest["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "two"
    errors = list(validators["RayCluster"].iter_errors(manifest))
    assert len(errors) == 2


def test_manifests_layout_is_safe_for_kubectl_apply(validators, cfg, tmp_path):
    """Every directory ``manifests`` writes holds either Kubernetes objects only, starting at most one
    cluster, or no Kubernetes object at all (the Serve configs)."""
    out = tmp_path / "k8s"
    data = cfg.model_dump(mode="json")
    data["train"]["jobs"]["solo"] = dict(data["train"]["jobs"]["demo"], publish_to=None, domain=None, output_dir=None)
    two_jobs = parse_config(data)
    paths = manifests(two_jobs, out)
    assert sorted(str(p.relative_to(out)) for p in paths) == [
        "raycluster/raycluster.yaml", "raycluster/rayjob-demo.yaml", "rayjobs/rayjob-solo.yaml",
        "rayservice/rayservice.yaml", "serve-config/local.yaml", "serve-config/raycluster.yaml"]
    assert not [p for p in out.iterdir() if p.is_file()]  # `kubectl apply -f k8s/` finds nothing to misapply
    for d in out.iterdir():
        docs = [yaml.safe_load(p.read_text()) for p in sorted(d.glob("*.yaml"))]
        if d.name == "serve-config":
            assert all("kind" not in doc and "applications" in doc for doc in docs)
            continue
        for doc in docs:
            _check(validators, doc)
        clusters = [doc for doc in docs if doc["kind"] in ("RayService", "RayCluster")
                    or (doc["kind"] == "RayJob" and "rayClusterSpec" in doc["spec"])]
        assert len(clusters) <= 1 or d.name == "rayjobs", d.name  # rayjobs: one cluster per job, by design
    job = yaml.safe_load((out / "raycluster" / "rayjob-demo.yaml").read_text())
    # demo publishes into the app, so it must run on the cluster that serves it
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cfg.kubernetes.name}
    # the RayCluster path: `serve deploy` of this file binds the proxy where the head service reaches it
    assert yaml.safe_load((out / "serve-config" / "raycluster.yaml").read_text())["http_options"]["host"] == "0.0.0.0"
    assert yaml.safe_load((out / "serve-config" / "local.yaml").read_text())["http_options"]["host"] == "127.0.0.1"
    # a second run replaces the files, and a job removed from the config leaves no stale RayJob behind
    manifests(cfg, out)
    assert not (out / "rayjobs" / "rayjob-solo.yaml").exists()


def test_serve_config_v2_does_not_change_with_training_jobs(cfg):
    """An edit to a training job must not touch serveConfigV2: KubeRay would redeploy Serve and Serve
    restart every replica (and reload the checkpoint) on any change of the application's args."""
    before = rayservice_manifest(cfg)["spec"]["serveConfigV2"]
    data = cfg.model_dump(mode="json")
    data["train"]["jobs"]["demo"].update(lr=0.5, steps=7, seq_len=256)
    data["train"]["jobs"]["extra"] = dict(data["train"]["jobs"]["demo"], publish_to=None)
    data["kubernetes"]["pod_template"] = {"metadata": {"annotations": {"team": "ml"}}}
    after = rayservice_manifest(parse_config(data))["spec"]["serveConfigV2"]
    assert after == before
    assert "train" not in yaml.safe_load(before)["applications"][0]["args"]["config"]
    # declaring a patch changes the deployment's user_config only: Serve reconfigures, no restart
    data["serving"]["patches"] = {"demo": "s3://bucket/runs/demo/patch"}
    app = yaml.safe_load(rayservice_manifest(parse_config(data))["spec"]["serveConfigV2"])["applications"][0]
    old = yaml.safe_load(before)["applications"][0]
    assert app["args"] == old["args"] and app["import_path"] == old["import_path"]
    assert app["deployments"][0]["user_config"] == {"patches": {"demo": "s3://bucket/runs/demo/patch"}}


def test_rayjob_carries_its_job_config(cfg, monkeypatch):
    from expertpool.jobs.finetune import prepare

    manifest = rayjob_manifest(cfg, "demo")
    env = yaml.safe_load(manifest["spec"]["runtimeEnvYAML"])["env_vars"]
    monkeypatch.setenv(CONFIG_ENV, env[CONFIG_ENV])
    monkeypatch.chdir(REPO)  # the image's working directory: the dataset is there
    plan = prepare(f"env:{CONFIG_ENV}", "demo")
    assert plan.output_dir == "s3://bucket/runs/demo" and plan.ray_storage == "s3://bucket/runs/demo/ray"
    assert plan.job.model_dump() == cfg.get_job("demo").model_dump()
    data = cfg.model_dump(mode="json")  # another job, or the Kubernetes settings, leave this RayJob unchanged
    data["train"]["jobs"]["other"] = dict(data["train"]["jobs"]["demo"], lr=0.5)
    data["kubernetes"]["namespace"] = "ml"
    other = rayjob_manifest(parse_config(data), "demo")
    assert other["spec"]["runtimeEnvYAML"] == manifest["spec"]["runtimeEnvYAML"]


def test_rayjob_refuses_pod_local_outputs(cfg):
    data = cfg.model_dump(mode="json")
    data["train"]["storage_path"] = None
    with pytest.raises(ConfigError, match=r"train\.jobs\.demo\.output_dir: '~/expertpool/runs/demo' is inside the "
                                          r"pod.*s3:// or gs://"):
        rayjob_manifest(parse_config(data), "demo")
    # a volume mounted into the Ray container holds it
    data["train"]["jobs"]["demo"]["output_dir"] = "/mnt/runs/demo"
    data["kubernetes"]["pod_template"] = {"spec": {
        "volumes": [{"name": "runs", "persistentVolumeClaim": {"claimName": "runs"}}],
        "containers": [{"name": "ray", "volumeMounts": [{"name": "runs", "mountPath": "/mnt/runs"}]}]}}
    manifest = rayjob_manifest(parse_config(data), "demo")
    pod = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert pod["containers"][0]["volumeMounts"] == [{"name": "runs", "mountPath": "/mnt/runs"}]


def test_pod_template_is_merged_into_every_pod(validators, cfg):
    data = cfg.model_dump(mode="json")
    data["kubernetes"]["pod_template"] = {
        "metadata": {"annotations": {"prometheus.io/scrape": "true"}, "labels": {"team": "ml"}},
        "spec": {"serviceAccountName": "expertpool", "imagePullSecrets": [{"name": "regcred"}],
                 "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
                 "volumes": [{"name": "cache", "emptyDir": {}}],
                 "containers": [{"name": "ray", "env": [
                     {"name": "EXPERTPOOL_CACHE", "value": "/cache"},
                     {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "id"}}}],
                     "volumeMounts": [{"name": "cache", "mountPath": "/cache"}]}]}}
    merged = parse_config(data)
    manifest = rayservice_manifest(merged)
    _check(validators, manifest)
    cluster = manifest["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]:
        tpl = group["template"]
        assert tpl["metadata"]["labels"]["team"] == "ml" and tpl["metadata"]["labels"]["app.kubernetes.io/name"]
        assert tpl["metadata"]["annotations"] == {"prometheus.io/scrape": "true"}
        spec = tpl["spec"]
        assert spec["serviceAccountName"] == "expertpool" and spec["imagePullSecrets"] == [{"name": "regcred"}]
        (ray,) = spec["containers"]  # merged into the Ray container, not added beside it
        assert ray["name"] in ("ray-head", "ray-worker") and ray["image"] == merged.kubernetes.image
        names = [e["name"] for e in ray["env"]]
        assert names[-2:] == ["EXPERTPOOL_CACHE", "AWS_ACCESS_KEY_ID"] and len(names) == len(set(names))
        assert ray["volumeMounts"] == [{"name": "cache", "mountPath": "/cache"}]
    assert deep_merge({"a": [{"name": "x", "v": 1}], "t": [1]}, {"a": [{"name": "x", "w": 2}, {"name": "y"}],
                                                               "t": [2]}) == \
        {"a": [{"name": "x", "v": 1, "w": 2}, {"name": "y"}], "t": [1, 2]}


def test_deepseek_v3_rayservice_applies_with_no_hand_edits(validators, tmp_path):
    """Acceptance: DeepSeek-V3 from the hub, 8 expert actors of 1 GPU each per replica on nodes tainted
    nvidia.com/gpu, the hub token from a Secret, and an ESFT job writing to s3://bucket/runs."""
    config = tmp_path / "cluster.yaml"
    config.write_text("""
model:
  path: deepseek-ai/DeepSeek-V3
pool:
  actors_per_replica: 8
  actor_resources: {cpu: 8, gpu: 1, memory_gb: 100}
serving:
  max_seq_len: 4096
  autoscaling: {min_replicas: 1, max_replicas: 4}
train:
  storage_path: s3://bucket/runs
  jobs:
    law-esft:
      base_model: deepseek-ai/DeepSeek-V3
      dataset: {path: data/demo_domain.jsonl}
      mode: esft
      workers: 64
      batch_size: 64
      seq_len: 1024
      worker_resources: {cpu: 8, gpu: 1, gpu_memory_gb: 80, memory_gb: 200}
kubernetes:
  image: registry.example.com/expertpool:0.1.0-gpu
  hf_token_secret: hf-token
  pod_template:
    spec:
      tolerations:
        - {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}
""")
    cfg = load_config(config)
    out = tmp_path / "k8s"
    manifests(cfg, out)
    service = yaml.safe_load((out / "rayservice" / "rayservice.yaml").read_text())
    job = yaml.safe_load((out / "rayjobs" / "rayjob-law-esft.yaml").read_text())
    for manifest in (service, job):
        _check(validators, manifest)
    cluster = service["spec"]["rayClusterConfig"]
    pool = _groups(cluster)[POOL_GROUP]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]] + \
        [g["template"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    for pod in pods:
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"]["tolerations"]
        env = {e["name"]: e for c in pod["spec"]["containers"] for e in c["env"]}
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    limits = pool["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "8" and (pool["minReplicas"], pool["maxReplicas"]) == (1, 4)
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve["http_options"]["host"] == "0.0.0.0"
    assert serve["applications"][0]["args"]["config"]["model"]["path"] == "deepseek-ai/DeepSeek-V3"
    assert serve["applications"][0]["args"]["config"]["model"]["name"] == "DeepSeek-V3"
    # the job's storage: Ray Train checkpoints and the patch under s3://bucket/runs/law-esft
    job_cfg = yaml.safe_load(yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"][CONFIG_ENV])
    assert job_cfg["train"]["storage_path"] == "s3://bucket/runs" and list(job_cfg["train"]["jobs"]) == ["law-esft"]
    assert parse_config(job_cfg).train.output_location("law-esft") == "s3://bucket/runs/law-esft"
    assert job["spec"]["entrypoint"].endswith(f"--config env:{CONFIG_ENV} --job law-esft")
    train = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert train["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert (train["minReplicas"], train["maxReplicas"]) == (64, 64)


def test_dockerfile_copies_only_paths_that_exist(cfg):
    """The image the manifests name builds from the project's own files."""
    dockerfile = (REPO / "Dockerfile").read_text()
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    copies = [line.split()[1:-1] for line in dockerfile.splitlines() if line.startswith("COPY")]
    sources = [src for args in copies for src in args if not src.startswith("--")]
    assert {"pyproject.toml", "expertpool", "cluster.yaml", "data"} <= set(sources)
    for src in sources:
        assert (REPO / src).exists(), f"Dockerfile copies {src}, which does not exist"
        assert not any(Path(src).match(pattern) or src.split("/")[0] == pattern for pattern in ignored), \
            f".dockerignore excludes {src}, which the Dockerfile copies"
    assert re.search(r"^RUN pip install --no-cache-dir \.$", dockerfile, re.M)
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert load_config(REPO / "cluster.yaml").kubernetes.image == f"expertpool:{version}"  # what it is tagged
