"""cluster.yaml schema: the shipped example loads, bad configs name the field and the fix, derivations are
what Ray 2.60 expects. No Ray cluster: Ray is imported only to run its own schema checks."""

import copy
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

import expertpool  # noqa: F401  (imported before ray: guards the `platform` stdlib-name shadowing)
from expertpool.platform.config import (
    SERVE_SECTIONS,
    API_KEY_ENV,
    DEPLOYMENT_NAME,
    ClusterConfig,
    ConfigError,
    field_paths,
    load_config,
    parse_config,
)

REPO = Path(__file__).parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"


@pytest.fixture(scope="module")
def shipped() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _bad(data: dict, *fragments: str) -> str:
    """Parse ``data`` expecting a ConfigError whose message contains every fragment; return the message."""
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="cluster.yaml")
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def _mutated(data: dict, dotted: str, value) -> dict:
    out = copy.deepcopy(data)
    *parents, leaf = dotted.split(".")
    node = out
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return out


# --- the shipped example ------------------------------------------------------------------------------


def test_shipped_cluster_yaml_loads_without_ray():
    cfg = load_config(CLUSTER_YAML)
    assert cfg.source == str(CLUSTER_YAML)
    assert cfg.model.path is None and cfg.model.name == "expertpool-tiny"
    assert cfg.pool.actors_per_replica == 2
    assert (cfg.serving.host, cfg.serving.port) == ("127.0.0.1", 8000)
    assert (cfg.serving.autoscaling.min_replicas, cfg.serving.autoscaling.max_replicas) == (1, 2)
    demo = cfg.get_job("demo")
    assert demo.mode == "esft" and demo.base_model is None
    assert demo.dataset.path == "data/demo_domain.jsonl" and demo.dataset.format == "jsonl"
    assert demo.output_dir == "demo" and demo.publish_to == cfg.serving.app_name
    # relative output_dir go under train.storage_path, by default a directory that outlives the job
    assert cfg.train.output_location("demo") == str(Path.home() / "expertpool" / "runs" / "demo")
    assert demo.esft.p == 0.2  # derived from scoring=token


def test_config_module_does_not_import_ray():
    import subprocess

    code = "import expertpool.platform.config as c, sys; c.load_config(sys.argv[1]); print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code, str(CLUSTER_YAML)], capture_output=True, text=True,
                         cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def test_dump_round_trips(shipped):
    cfg = parse_config(shipped)
    again = parse_config(json.loads(json.dumps(cfg.model_dump(mode="json"))))
    assert again == cfg


def test_empty_file_is_all_defaults(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("")
    cfg = load_config(path)
    assert cfg.model_dump() == ClusterConfig().model_dump()
    assert cfg.pool.actors_per_replica == 2 and cfg.serving.autoscaling.max_replicas == 1


def test_commented_out_section_reads_as_empty():
    cfg = parse_config({"serving": None, "train": {"jobs": None}, "pool": {"actor_resources": None}})
    assert cfg.serving.port == 8000 and cfg.train.jobs == {} and cfg.pool.actor_resources.cpu == 1
    _bad({"serving": {"port": None}}, "serving.port:", "set port to an integer")  # scalars never default silently


def test_every_field_is_documented():
    missing = [path for path, field in field_paths() if not (field.description or "").strip()]
    assert not missing


def test_operations_doc_reference_tables_are_generated_from_the_schema():
    """The committed tables equal `expertpool schema --markdown`: a new or edited field is a failing test
    until the docs are regenerated (``config_schema.replace_reference``)."""
    from expertpool.platform.config_schema import BEGIN, END, reference_markdown, replace_reference

    doc = (REPO / "docs" / "operations.md").read_text()
    assert doc.count(BEGIN) == 1 and doc.count(END) == 1
    assert replace_reference(doc) == doc, ("docs/operations.md's configuration reference is stale: paste "
                                           "`expertpool schema --markdown` between its markers")
    tables = reference_markdown()
    missing = [path for path, _ in field_paths() if f"| `{path}` |" not in tables]
    assert not missing, missing
    assert "| `serving.port` | int | `8000` | Serve HTTP proxy port. |" in tables
    assert "| `train.jobs.NAME.dataset.path` | str | **required** |" in tables
    assert "| `pool.actor_resources.custom` | map of str → float | `{}` |" in tables


def test_json_schema_is_committed_current_and_named_by_cluster_yaml(shipped):
    import jsonschema

    from expertpool.platform.config_schema import SCHEMA_PATH, json_schema, json_schema_text

    assert (REPO / SCHEMA_PATH).read_text() == json_schema_text(), \
        f"{SCHEMA_PATH} is stale: run `expertpool schema > {SCHEMA_PATH}`"
    assert CLUSTER_YAML.read_text().splitlines()[0] == f"# yaml-language-server: $schema=./{SCHEMA_PATH}"
    validator = jsonschema.Draft202012Validator(json_schema())
    validator.check_schema(validator.schema)
    validator.validate(shipped)  # the shipped example is valid to an editor too
    errors = [e.message for e in validator.iter_errors(_mutated(shipped, "serving.prot", 9000))]
    assert errors == ["Additional properties are not allowed ('prot' was unexpected)"]


# --- errors name the field and the fix -----------------------------------------------------------------


def test_unknown_key_is_named_with_suggestion(shipped):
    msg = _bad(_mutated(shipped, "serving.prot", 9000), "cluster.yaml: serving.prot: unknown field",
               "did you mean 'port'?")
    assert msg.count("\n") == 0


def test_unknown_key_inside_a_job(shipped):
    _bad(_mutated(shipped, "train.jobs.demo.dataset.pth", "x"), "train.jobs.demo.dataset.pth: unknown field",
         "did you mean 'path'?")


def test_wrong_type(shipped):
    _bad(_mutated(shipped, "serving.port", "eighty"), "serving.port:", "'eighty'", "set port to an integer")
    _bad(_mutated(shipped, "pool.placement_strategy", "pack"), "pool.placement_strategy:", "'PACK'")
    _bad(_mutated(shipped, "pool", 3), "pool: expected a mapping")


def test_min_above_max_replicas(shipped):
    data = _mutated(shipped, "serving.autoscaling.min_replicas", 3)
    msg = _bad(data, "cluster.yaml: serving.autoscaling.max_replicas: must be >= min_replicas (3); "
                     "set max_replicas to at least 3")
    assert msg.count("\n") == 0


def test_initial_replicas_outside_bounds(shipped):
    _bad(_mutated(shipped, "serving.autoscaling.initial_replicas", 5), "serving.autoscaling.initial_replicas:",
         "[1, 2]")


@pytest.mark.parametrize("p", [0, -0.1, 1.5])
def test_esft_p_out_of_range(shipped, p):
    _bad(_mutated(shipped, "train.jobs.demo.esft.p", p), "train.jobs.demo.esft.p: must be in (0, 1]", "set p to")


def test_esft_p_default_follows_scoring(shipped):
    cfg = parse_config(_mutated(shipped, "train.jobs.demo.esft", {"scoring": "gate"}))
    assert cfg.get_job("demo").esft.p == 0.1


def test_several_problems_are_all_reported(shipped):
    data = _mutated(_mutated(shipped, "serving.autoscaling.min_replicas", 3), "pool.bogus", 1)
    msg = _bad(data, "serving.autoscaling.max_replicas", "pool.bogus")
    assert msg.count("\n") == 1


def test_publish_to_unknown_app(shipped):
    _bad(_mutated(shipped, "train.jobs.demo.publish_to", "other"), "train.jobs.demo.publish_to:",
         "set publish_to to 'expertpool'")


def test_cross_field_rules_without_model(shipped):
    _bad(_mutated(shipped, "serving.kv_cache", {"num_blocks": 4}), "serving.kv_cache.num_blocks:",
         "at least 32")
    _bad(_mutated(shipped, "serving.kv_cache", {"num_blocks": 64, "memory_gb": 1}), "set only one of")
    _bad(_mutated(shipped, "serving.max_num_batched_tokens", 8), "serving.max_num_batched_tokens:")
    _bad(_mutated(shipped, "pool.backend", "nccl"), "pool.backend:", "actor_resources.gpu")
    _bad(_mutated(shipped, "pool.actor_resources", {"cpu": 0}), "pool.actor_resources.cpu:")
    _bad(_mutated(shipped, "train.jobs.demo.batch_size", 3), "train.jobs.demo.batch_size:", "multiple of 2")
    _bad(_mutated(shipped, "train.jobs.demo.dataset.path", "d.csv"), "train.jobs.demo.dataset.format:")
    _bad(_mutated(shipped, "serving.route_prefix", "v1"), "serving.route_prefix:", "'/v1'")
    _bad(_mutated(shipped, "serving.max_queued_requests", 0), "serving.max_queued_requests:", "or -1")
    _bad(_mutated(shipped, "model.name", "a:b"), "model.name:")
    bad_name = copy.deepcopy(shipped)
    bad_name["train"]["jobs"]["Bad_Job"] = bad_name["train"]["jobs"].pop("demo")
    _bad(bad_name, "train.jobs.Bad_Job:", "lowercase")


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("serving:\n  port: 1\nserving:\n  port: 2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: line 3.*duplicate key 'serving'"):
        load_config(path)
    path.write_text("serving: [\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: .*invalid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml")


# --- rules that need the model ---------------------------------------------------------------------------


def _model(n_routed_experts: int = 8, max_position_embeddings: int = 4096, **kw):
    """The tiny architecture with ``n_routed_experts`` in one group: what validate_against_model reads."""
    from expertpool.model.args import preset

    return preset("tiny").replace(n_routed_experts=n_routed_experts, n_group=1, topk_group=1,
                                  max_position_embeddings=max_position_embeddings, **kw)


def test_uneven_widths_are_a_placement_check(shipped):
    """Elastic EP: 3 actors over 8 experts is a valid placement (3, 3, 2 slots with 1 redundant copy);
    what no placement can satisfy is refused with the field and the fix."""
    cfg = parse_config(_mutated(shipped, "pool", {"actors_per_replica": 3, "redundant_experts": 1}))
    assert cfg.validate_against_model(_model(8))["pool.expert_slots_per_actor"] == [3, 3, 3]
    cfg = parse_config(_mutated(shipped, "pool.actors_per_replica", 9), source="cluster.yaml")
    with pytest.raises(ConfigError) as info:
        cfg.validate_against_model(_model(8))
    assert str(info.value).startswith("cluster.yaml: pool.actors_per_replica: 9 actors exceed the 8 expert slots")
    cfg = parse_config(_mutated(shipped, "pool", {"actors_per_replica": {"min": 2, "max": 4}, "redundant_experts": 25}))
    with pytest.raises(ConfigError, match="two copies of one expert; set redundant_experts to at most 24"):
        cfg.validate_against_model(_model(8))
    # a narrower width uses the redundant slots it can hold (one actor: none)
    cfg = parse_config(_mutated(shipped, "pool", {"actors_per_replica": {"min": 1, "max": 3, "initial": 1},
                                                  "redundant_experts": 8}))
    assert cfg.validate_against_model(_model(8))["pool.expert_slots_per_actor"] == [8]


@pytest.mark.parametrize("pool, needle", [
    ({"actors_per_replica": {"min": 4, "max": 2}}, "pool.actors_per_replica.max: (2) is below min (4)"),
    ({"actors_per_replica": {"min": 2, "max": 4, "initial": 5}}, "initial: (5) is outside [2, 4]"),
    ({"actors_per_replica": 2, "autoscale_width": True}, "autoscale_width: needs room to change"),
    ({"eplb": {"window_steps": 0}}, "pool.eplb.window_steps: must be >= 1"),
])
def test_invalid_widths_and_redundancy_name_field_and_fix(pool, needle):
    with pytest.raises(ConfigError) as info:
        parse_config({"pool": pool})
    assert needle in str(info.value), str(info.value)


def test_width_range_reserves_bundles_up_to_max():
    cfg = parse_config({"pool": {"actors_per_replica": {"min": 2, "max": 4}, "actor_resources": {"cpu": 0.5}}})
    assert cfg.pool.width == 2 and cfg.pool.max_width == 4
    assert cfg.pool.placement_group_bundles() == [{"CPU": 0.1}] + [{"CPU": 0.5}] * 4


def test_train_workers_checked_against_experts(shipped):
    cfg = parse_config(_mutated(shipped, "train.jobs.demo.experts_per_worker", 3))
    with pytest.raises(ConfigError, match=r"train\.jobs\.demo\.experts_per_worker: .*set experts_per_worker to 4"):
        cfg.validate_against_model(_model(8))
    cfg = parse_config(_mutated(_mutated(shipped, "train.jobs.demo.workers", 3), "train.jobs.demo.batch_size", 6))
    with pytest.raises(ConfigError, match=r"train\.jobs\.demo\.workers: 8 routed experts"):
        cfg.validate_against_model(_model(8))


def test_validate_against_model_returns_derived_values(shipped):
    cfg = parse_config(shipped)
    derived = cfg.validate_against_model(_model(8, 4096))
    assert derived == {"pool.expert_slots_per_actor": [4, 4], "train.jobs.demo.experts_per_worker": 4,
                       "serving.kv_cache.num_blocks": 32 * 512 // 16}
    assert cfg.get_job("demo").resolved_experts_per_worker(8) == 4
    with pytest.raises(ConfigError, match=r"serving\.max_seq_len: \(512\) exceeds the model's "
                       r"max_position_embeddings \(256\); set max_seq_len to at most 256"):
        cfg.validate_against_model(_model(8, 256))


def test_kv_bytes_per_token_come_from_the_model(shipped):
    """The latent (kv_lora_rank) and rope key of every layer, in the compute dtype; plus the MTP layer's
    own cache when speculative decoding is on."""
    import torch

    args = _model(8, num_hidden_layers=5, kv_lora_rank=512, qk_rope_head_dim=64, num_nextn_predict_layers=1)
    cfg = parse_config(shipped)
    assert cfg.kv_bytes_per_token(args, "float32") == 5 * (512 + 64) * 4
    assert cfg.kv_bytes_per_token(args) == 5 * (512 + 64) * torch.empty((), dtype=getattr(
        torch, "bfloat16" if cfg.model.dtype == "auto" else cfg.model.dtype)).element_size()
    spec = parse_config(_mutated(_mutated(shipped, "serving.speculative", {"num_speculative_tokens": 1}),
                                 "serving.async_scheduling", False))
    assert spec.kv_bytes_per_token(args, "float32") == 6 * (512 + 64) * 4


def test_kv_memory_budget(shipped):
    """A kv_cache.memory_gb below one sequence of max_seq_len is refused with the size that would hold one."""
    args = _model(8, num_hidden_layers=61, kv_lora_rank=512, qk_rope_head_dim=64)
    cfg = parse_config(_mutated(_mutated(shipped, "serving.kv_cache", {"memory_gb": 0.01, "block_size": 16}),
                                "model.dtype", "float32"))
    bytes_per_token = 61 * (512 + 64) * 4
    assert cfg.serving.num_kv_blocks(bytes_per_token) == int(0.01 * 2**30) // (bytes_per_token * 16)
    assert cfg.serving.num_kv_blocks(bytes_per_token) * 16 < cfg.serving.max_seq_len  # the budget is too small
    need = -(-cfg.serving.max_seq_len // 16) * 16 * bytes_per_token / 2**30
    with pytest.raises(ConfigError, match=rf"serving\.kv_cache\.memory_gb: 0\.01 GiB holds \d+ blocks, fewer than "
                       rf"one sequence .*set memory_gb to at least {need:.3g}"):
        cfg.validate_against_model(args)
    ok = parse_config(_mutated(_mutated(shipped, "serving.kv_cache", {"memory_gb": round(need * 1.01, 4)}),
                               "model.dtype", "float32"))
    assert ok.validate_against_model(args)["serving.kv_cache.num_blocks"] * 16 >= ok.serving.max_seq_len


def test_unknown_job_lists_known_jobs(shipped):
    cfg = parse_config(shipped)
    with pytest.raises(ConfigError, match=r"train\.jobs: no job named 'dem' \(known: demo\); did you mean 'demo'"):
        cfg.get_job("dem")


# --- dataset check (runs before workers start) -------------------------------------------------------------


def _job_with_dataset(shipped, path) -> ClusterConfig:
    return parse_config(_mutated(shipped, "train.jobs.demo.dataset.path", str(path)), source="cluster.yaml")


def test_dataset_missing(shipped, tmp_path):
    cfg = _job_with_dataset(shipped, tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match=r"^cluster\.yaml: train\.jobs\.demo\.dataset\.path: .* does not exist"):
        cfg.get_job("demo").check_dataset()


def test_dataset_empty(shipped, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    cfg = _job_with_dataset(shipped, tmp_path / "empty.jsonl")
    with pytest.raises(ConfigError, match=r"train\.jobs\.demo\.dataset\.path: .* is empty"):
        cfg.get_job("demo").check_dataset()
    (tmp_path / "dir").mkdir()
    cfg = _job_with_dataset(shipped, tmp_path / "dir")
    with pytest.raises(ConfigError, match="is empty"):
        cfg.get_job("demo").check_dataset()


def test_dataset_field_detected(shipped, tmp_path):
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    (tmp_path / "plain.jsonl").write_text("\n" + json.dumps({"text": "hello"}) + "\n")
    (tmp_path / "other.jsonl").write_text(json.dumps({"prompt": "hello"}) + "\n")
    assert _job_with_dataset(shipped, tmp_path / "chat.jsonl").get_job("demo").check_dataset().field == "messages"
    relative = _mutated(shipped, "train.jobs.demo.dataset.path", "plain.jsonl")
    checked = parse_config(relative).get_job("demo").check_dataset(base_dir=tmp_path)
    assert (checked.field, checked.format) == ("text", "jsonl")
    with pytest.raises(ConfigError, match=r"train\.jobs\.demo\.dataset\.field: .*\['prompt'\]"):
        _job_with_dataset(shipped, tmp_path / "other.jsonl").get_job("demo").check_dataset()


# --- derivations -----------------------------------------------------------------------------------------


def test_placement_group_bundles(shipped):
    cfg = parse_config(_mutated(shipped, "pool.actor_resources",
                                {"cpu": 2, "gpu": 1, "memory_gb": 4, "custom": {"H100": 0.01}}))
    bundles = cfg.pool.placement_group_bundles()
    assert bundles[0] == {"CPU": 0.1}  # the replica actor itself goes in the first bundle
    assert bundles[1:] == [{"CPU": 2, "GPU": 1, "memory": 4 * 2**30, "H100": 0.01}] * 2
    assert bundles[1] is not bundles[2]
    assert cfg.pool.actor_bundle_index(0) == 1
    assert cfg.pool.resolved_backend() == "nccl"
    assert cfg.pool.actor_resources.ray_options() == {"num_cpus": 2, "num_gpus": 1, "memory": 4 * 2**30,
                                                      "resources": {"H100": 0.01}}


def test_serve_deployment_options(shipped):
    cfg = parse_config(_mutated(shipped, "serving.autoscaling.initial_replicas", 2))
    opts = cfg.serve_deployment_options()
    assert opts["name"] == DEPLOYMENT_NAME
    assert opts["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 2, "initial_replicas": 2, "target_ongoing_requests": 16,
        "upscale_delay_s": 30, "downscale_delay_s": 600, "metrics_interval_s": 10, "look_back_period_s": 30}
    assert opts["placement_group_bundles"] == [{"CPU": 0.1}, {"CPU": 0.5}, {"CPU": 0.5}]
    assert opts["placement_group_strategy"] == "PACK"
    assert opts["ray_actor_options"] == {"num_cpus": 0.1}
    assert (opts["max_ongoing_requests"], opts["max_queued_requests"]) == (64, 128)
    assert (opts["health_check_period_s"], opts["health_check_timeout_s"]) == (10, 30)


def test_deployment_options_accepted_by_ray_serve(shipped):
    from ray import serve
    from ray.serve.config import AutoscalingConfig

    cfg = parse_config(shipped)
    opts = cfg.serve_deployment_options()
    assert set(opts["autoscaling_config"]) <= set(AutoscalingConfig.model_fields)
    AutoscalingConfig(**opts["autoscaling_config"])

    class Replica:
        pass

    deployment = serve.deployment(**opts)(Replica)  # validates bundles, strategy, bundle-0 fit; no cluster needed
    assert deployment.name == DEPLOYMENT_NAME
    too_big = dict(opts, ray_actor_options={"num_cpus": 1})
    with pytest.raises(ValueError, match="first bundle"):  # the check our bundle 0 is built to pass
        serve.deployment(**too_big)(Replica)


def test_serve_config_validates_against_ray_schema(shipped):
    from pydantic import ValidationError
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    cfg = parse_config(shipped)
    serve_cfg = cfg.serve_config()
    schema = ServeDeploySchema.model_validate(serve_cfg)
    app = schema.applications[0]
    assert (app.name, app.route_prefix, app.import_path) == ("expertpool", "/", "expertpool.platform.app:build_app")
    assert app.deployments[0].name == DEPLOYMENT_NAME
    assert app.deployments[0].autoscaling_config["max_replicas"] == 2
    assert (schema.http_options.host, schema.http_options.port) == ("127.0.0.1", 8000)
    # build_app rebuilds what a replica reads from args: model, pool and serving, the patches apart
    rebuilt = parse_config(app.args["config"])
    assert rebuilt.model_dump(include=set(SERVE_SECTIONS)) == cfg.model_dump(include=set(SERVE_SECTIONS))
    assert set(app.args["config"]) == set(SERVE_SECTIONS) and "patches" not in app.args["config"]["serving"]
    assert app.deployments[0].user_config == {"patches": {}}
    # Ray's DeploymentSchema ignores unknown keys, so check ours are all real Ray field names
    assert set(serve_cfg["applications"][0]["deployments"][0]) <= set(DeploymentSchema.model_fields)
    assert set(serve_cfg["applications"][0]) <= set(ServeApplicationSchema.model_fields)
    bad_type = dict(serve_cfg["applications"][0]["deployments"][0], max_ongoing_requests="many")
    with pytest.raises(ValidationError):  # ... and that the Ray schema does check what it knows
        ServeDeploySchema.model_validate(dict(serve_cfg, applications=[
            dict(serve_cfg["applications"][0], deployments=[bad_type])]))


def test_api_key_resolution(shipped):
    cfg = parse_config(shipped)
    assert cfg.serving.resolve_api_key({}) is None
    assert cfg.serving.resolve_api_key({API_KEY_ENV: ""}) is None
    assert cfg.serving.resolve_api_key({API_KEY_ENV: "from-env"}) == "from-env"
    keyed = parse_config(_mutated(shipped, "serving.api_key", "from-file"))
    assert keyed.serving.resolve_api_key({API_KEY_ENV: "from-env"}) == "from-file"


def test_derived_names(shipped):
    cfg = parse_config(_mutated(_mutated(shipped, "model.path", "/ckpt/DeepSeek-V3/"), "train.jobs.demo.base_model",
                                "/ckpt/DeepSeek-V3/"))
    assert cfg.model.name == "DeepSeek-V3" and cfg.model.tokenizer == "/ckpt/DeepSeek-V3/"
    job = copy.deepcopy(shipped["train"]["jobs"]["demo"])
    for key in ("output_dir", "domain", "publish_to"):
        job.pop(key)
    cfg = parse_config(_mutated(shipped, "train.jobs", {"law-esft": job}))
    assert cfg.get_job("law-esft").output_dir == "law-esft" and cfg.get_job("law-esft").domain == "law-esft"
    assert re.fullmatch(r"[a-z0-9-]+", cfg.kubernetes.name)


def test_serve_config_ignores_everything_but_model_pool_and_serving(shipped):
    """Serve restarts every replica when an application's args change: a training job or a Kubernetes
    setting must leave the Serve config byte-identical; a declared patch changes only user_config."""
    base = yaml.safe_dump(parse_config(shipped).serve_config())
    for path, value in (("train.jobs.demo.lr", 0.5), ("train.jobs.demo.steps", 7),
                        ("kubernetes.image", "registry.example.com/x:1"), ("train.storage_path", "s3://b/runs")):
        assert yaml.safe_dump(parse_config(_mutated(shipped, path, value)).serve_config()) == base, path
    patched = parse_config(_mutated(shipped, "serving.patches", {"law": "s3://b/runs/law/patch"})).serve_config()
    app, before = patched["applications"][0], parse_config(shipped).serve_config()["applications"][0]
    assert app["args"] == before["args"] and app["import_path"] == before["import_path"]  # same code version
    assert app["deployments"][0]["user_config"] == {"patches": {"law": "s3://b/runs/law/patch"}}


@pytest.mark.parametrize("path,name", [("deepseek-ai/DeepSeek-V3", "DeepSeek-V3"),
                                       ("deepseek-ai/DeepSeek-V3@v1.0", "DeepSeek-V3"),
                                       ("s3://bucket/models/DeepSeek-V3/", "DeepSeek-V3"),
                                       ("gs://bucket/m/v3", "v3"), ("/ckpt/tiny", "tiny")])
def test_model_locations(shipped, path, name):
    cfg = parse_config(_mutated(_mutated(shipped, "model.path", path), "train.jobs.demo.base_model", path))
    assert cfg.model.name == name and cfg.model.tokenizer == path


def test_bad_locations_and_outputs(shipped):
    with pytest.raises(ConfigError, match=r"model\.path: 's3://' names no bucket"):
        parse_config(_mutated(shipped, "model.path", "s3://"))
    with pytest.raises(ConfigError, match=r"output_dir: 'hf://org/name' is a Hugging Face repo"):
        parse_config(_mutated(shipped, "train.jobs.demo.output_dir", "hf://org/name"))
    # outputs are never read from the hub: a relative `team/law` is a path under train.storage_path
    cfg = parse_config(_mutated(shipped, "train.jobs.demo.output_dir", "team/law"))
    assert cfg.train.output_location("demo") == str(Path.home() / "expertpool" / "runs" / "team" / "law")
    cfg = parse_config(_mutated(shipped, "train.storage_path", "s3://bucket/runs"))
    assert cfg.train.output_location("demo") == "s3://bucket/runs/demo"
    cfg = parse_config(_mutated(shipped, "train.jobs.demo.output_dir", "gs://b/x"))
    assert cfg.train.output_location("demo") == "gs://b/x"
    with pytest.raises(ConfigError, match=r"serving\.patches\.law school: has characters"):
        parse_config(_mutated(shipped, "serving.patches", {"law school": "/p"}))


def test_gpu_training_jobs_declare_one_whole_gpu_and_its_memory(shipped):
    with pytest.raises(ConfigError, match=r"worker_resources\.gpu_memory_gb: is unset.*set it to the memory"):
        parse_config(_mutated(shipped, "train.jobs.demo.worker_resources", {"cpu": 1, "gpu": 1}))
    with pytest.raises(ConfigError, match=r"worker_resources\.gpu: \(0\.5\) is not one whole GPU per worker"):
        parse_config(_mutated(shipped, "train.jobs.demo.worker_resources",
                              {"cpu": 1, "gpu": 0.5, "gpu_memory_gb": 80}))
    cfg = parse_config(_mutated(shipped, "train.jobs.demo.worker_resources", {"cpu": 1, "gpu": 1, "gpu_memory_gb": 80}))
    assert cfg.get_job("demo").worker_resources.bundle() == {"CPU": 1, "GPU": 1}  # gpu_memory_gb is no Ray resource


def test_pod_template_is_a_partial_pod_template(shipped):
    with pytest.raises(ConfigError, match=r"kubernetes\.pod_template: has \['tolerations'\] at the top"):
        parse_config(_mutated(shipped, "kubernetes.pod_template", {"tolerations": []}))
    parse_config(_mutated(shipped, "kubernetes.pod_template", {"spec": {"tolerations": []}, "metadata": {}}))


# --- GPUs: NCCL ranks and the per-actor memory plan ----------------------------------------------------


def test_nccl_needs_whole_gpus(shipped):
    for gpu in (0.5, 1.5):
        _bad(_mutated(shipped, "pool.actor_resources", {"cpu": 1, "gpu": gpu}), "pool.actor_resources.gpu:",
             "whole number >= 1", "pool.backend to gloo")
        _bad(_mutated(shipped, "pool", {"backend": "nccl", "actor_resources": {"cpu": 1, "gpu": gpu}}),
             "whole number >= 1")
    parse_config(_mutated(shipped, "pool.actor_resources", {"cpu": 1, "gpu": 2}))
    parse_config(_mutated(shipped, "pool", {"backend": "gloo", "actor_resources": {"cpu": 1, "gpu": 0.5}}))
    _bad(_mutated(shipped, "pool.actor_resources", {"cpu": 1, "gpu_memory_gb": 80}),
         "pool.actor_resources.gpu_memory_gb:", "set gpu")


GIB = 2**30


def _v3_expected_bytes(actors: int) -> dict:
    """The DeepSeek-V3 plan by hand (FP8 checkpoint as shipped, bf16 compute, serving defaults:
    max_seq_len 512, max_num_batched_tokens 256, max_batch_size 32), from the shapes in
    docs/architecture.md. fp8 weights are 1 byte plus one fp32 scale per 128x128 block."""
    def fp8(n, k):
        return n * k + -(-n // 128) * -(-k // 128) * 4
    expert = 2 * fp8(2048, 7168) + fp8(7168, 2048)                     # 44,050,944 B: gate, up, down
    assert expert == 44_050_944
    routed = 58 * (256 // actors) * expert                              # 58 MoE layers (3 dense)
    attention = (fp8(1536, 7168) + 1536 * 2                             # q_a + q_a_layernorm (bf16)
                 + fp8(128 * 192, 1536)                                 # q_b
                 + fp8(576, 7168) + 512 * 2                             # kv_a + kv_a_layernorm
                 + fp8(128 * 256, 512) + 128 * 256 * 512 * 2            # kv_b + its dense bf16 copy (absorbed)
                 + 128 * 256 * 512 * 2                                  # W_UK + W_UV^T copies (absorbed decode)
                 + fp8(7168, 128 * 128)                                 # o
                 + 2 * 7168 * 2)                                        # input/post-attention norms
    moe_dense = expert + 256 * 7168 * 4 + 256 * 4                       # shared expert, router weight + bias (fp32)
    dense_mlp = 2 * fp8(18432, 7168) + fp8(7168, 18432)
    dense = 61 * attention + 58 * moe_dense + 3 * dense_mlp + 7168 * 2  # + final norm
    embed_head = 2 * 129280 * 7168 * 2                                   # bf16 embedding and lm_head
    kv_min = 512 * 61 * 576 * 2                                          # one max_seq_len sequence, bf16
    tokens, pairs = 256, 256 * 8
    attn_act = (512 * 128 * (2 * 192 + 256) + 2 * tokens * 128 * 192) * 2  # context k, v, kv_b out; chunk q, out
    moe_act = pairs * 2048 * 3 + pairs * 7168 * 2 + tokens * 7168 * 5      # h (bf16 + fp8), per-pair out, fp32 sum
    activations = max(attn_act, moe_act) + 6 * tokens * 7168 * 2 + (32 // actors) * 129280 * (2 + 4)
    comm = 3 * pairs * 7168 * 2 + 2 * pairs * 8 + GIB                    # all-to-all rows out/in/back, ids, NCCL
    return {"experts": routed, "dense": dense, "embed_head": embed_head, "kv_min": kv_min,
            "activations": activations, "comm": comm, "runtime": 2 * GIB}


def test_memory_plan_of_deepseek_v3_matches_the_hand_computation(shipped):
    """From the deepseek-v3 preset's config alone (no weights): 8 actors on 80 GiB GPUs are refused
    with the fix, 16 actors fit, 8 actors on H200s (141 GB) fit; every term equals the hand count."""
    from expertpool.model.args import preset
    from expertpool.platform import actor_memory as memory_plan

    v3 = preset("deepseek-v3")
    for actors in (8, 16):
        cfg = parse_config(_mutated(_mutated(shipped, "pool.actors_per_replica", actors),
                                    "pool.actor_resources", {"cpu": 8, "gpu": 1}))
        p = memory_plan.plan(v3, actors, **cfg.plan_inputs())
        want = _v3_expected_bytes(actors)
        got = {**p.weights, "kv_min": p.kv_min, "activations": p.activations, "comm": p.comm, "runtime": p.runtime}
        assert got == want, {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert round(_v3_expected_bytes(8)["experts"] / GIB, 1) == 76.1  # the 76 GiB of experts per actor

    def config(actors, gb):
        return parse_config(_mutated(_mutated(shipped, "pool.actors_per_replica", actors), "pool.actor_resources",
                                     {"cpu": 8, "gpu": 1, "gpu_memory_gb": gb}))
    total8 = sum(_v3_expected_bytes(8).values())
    total16 = sum(_v3_expected_bytes(16).values())
    with pytest.raises(ConfigError) as info:
        config(8, 80).validate_against_model(v3)
    message = str(info.value)
    assert f"8 actors need {total8 / GIB:.1f} GiB each" in message
    assert f"use 16 actors ({total16 / GIB:.1f} GiB each) or GPUs with >= {-(-total8 // GIB)} GiB" in message
    assert "pool.actor_resources.gpu_memory_gb" in message
    assert config(16, 80).validate_against_model(v3)["pool.memory_per_actor_gib"] == round(
        total16 / GIB, 1)
    assert config(8, 141).validate_against_model(v3)["pool.memory_per_actor_gib"] == round(
        total8 / GIB, 1)
