"""``expertpool serve`` and ``expertpool publish``: start or join Ray, deploy, report, wait."""

import logging
import signal
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


def resolve_config(config_path: str | None, *, model: str | None = None, port: int | None = None,
                   actors: int | None = None):
    from expertpool.platform.config import load_config, parse_config
    if config_path is None and Path("cluster.yaml").exists():
        config_path = "cluster.yaml"
    data = load_config(config_path).model_dump(mode="json", exclude_unset=True) if config_path else {}
    if model:
        data.setdefault("model", {})["path"] = model
        data["model"].pop("name", None)
        data["model"].pop("tokenizer", None)
        # training jobs are declared against the file's model; serving another model does not run them
        data.pop("train", None)
    if port:
        data.setdefault("serving", {})["port"] = port
    if actors:
        data.setdefault("pool", {})["actors_per_replica"] = actors
    return parse_config(data, source=config_path or "defaults")


def deploy(cfg, *, address: str | None = None):
    import ray
    from ray import serve

    from expertpool.model.args import ModelArgs
    from expertpool.model.embedded import ensure_embedded_model
    from expertpool.platform.app import build_app_from_config

    model_dir = cfg.model.path or ensure_embedded_model()  # create the embedded model once, before replicas
    cfg.validate_against_model(ModelArgs.from_dir(model_dir).n_routed_experts)
    if not ray.is_initialized():
        from expertpool.platform.proxy import set_proxy_env

        set_proxy_env()  # applies when this call starts the Ray instance (see platform/proxy.py)
        ray.init(address=address, include_dashboard=False)
    s = cfg.serving
    serve.start(http_options={"host": s.host, "port": s.port})
    t0 = time.time()
    serve.run(build_app_from_config(cfg), name=s.app_name, route_prefix=s.route_prefix, blocking=False)
    url = f"http://{s.host}:{s.port}{s.route_prefix.rstrip('/')}"
    log.info("deployed %s in %.1fs", s.app_name, time.time() - t0)
    return url


def serve_main(a) -> None:
    from expertpool.platform.config import ConfigError
    try:
        cfg = resolve_config(a.config, model=a.model, port=a.port, actors=a.actors)
        url = deploy(cfg, address=a.address)
    except ConfigError as e:
        print(f"invalid config: {e}", file=sys.stderr)
        sys.exit(2)
    name = cfg.model.name
    print(f"\nexpertpool is serving {name} at {url}/v1  (Ctrl-C to stop)\n"
          f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
          f"    -d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}], "
          f"\"max_tokens\": 16}}'\n", flush=True)
    if a.no_block:
        return
    from ray import serve
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    print("shutting down", flush=True)
    serve.shutdown()


def publish_main(a) -> None:
    import ray

    from expertpool.platform.patches import publish
    ray.init(address=a.address, include_dashboard=False, logging_level=logging.WARNING)
    model_id = publish(a.app, a.patch, a.domain)
    print(f"published {a.patch}: app {a.app} now serves {model_id}")
