"""The ``expertpool`` command: init-model, generate, serve, validate, manifests, schema, publish, scale.

Every subcommand is a thin wrapper: argument parsing here, the work in the library. Heavy imports
(torch, ray) happen inside the subcommand so ``expertpool --help`` is instant.

Errors: anything a user can get wrong raises a :class:`~expertpool.errors.UserError` in the library;
:func:`main` catches it once and prints ``expertpool: error: <message>`` (exit status 2, as argparse's
own usage errors), with the traceback only under ``-v``. Other exceptions are bugs and keep their
traceback.
"""

import argparse
import logging
import signal
import sys
import time
import traceback
from pathlib import Path

from expertpool import __version__
from expertpool.errors import UserError
from expertpool.model.args import PRESETS  # dataclasses only: `expertpool --help` stays instant

EXIT_USER_ERROR = 2


def _cmd_init_model(a):
    from expertpool.model.embedded import init_model
    t = time.time()
    out = init_model(a.preset, a.out, fp8=a.fp8, seed=a.seed)
    print(f"wrote {a.preset} checkpoint{' (fp8)' if a.fp8 else ''} to {out} in {time.time() - t:.1f}s")


def _cmd_generate(a):
    from expertpool.model.dtype import log_choice, resolve_dtype
    from expertpool.model.embedded import ensure_embedded_model
    from expertpool.model.sampling import SamplingParams
    from expertpool.model.storage import resolve_model
    from expertpool.model.tokenizer import Tokenizer
    from expertpool.platform.engine import generate, local_engine
    from expertpool.platform.worker import load_model

    model_dir = resolve_model(a.model) if a.model else ensure_embedded_model()
    t0 = time.time()
    choice = resolve_dtype(a.dtype, "cpu")
    log_choice(a.dtype, choice, "cpu")
    model = load_model(model_dir, choice.dtype, a.weight_dtype)  # as a serving actor loads it
    tok = Tokenizer.from_dir(model_dir)
    logging.info("loaded %s in %.1fs", model_dir, time.time() - t0)
    prompts = a.prompt or ["Hello, how are you?"]
    if a.chat:
        ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]), add_bos=False) for p in prompts]
    else:
        ids = [tok.encode(p) for p in prompts]
    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed)
    core = local_engine(model, max_batch_size=max(1, len(ids)),
                        max_seq_len=max(len(x) for x in ids) + a.max_tokens + 1, eos_token_id=tok.eos_token_id)
    single = len(ids) == 1
    counts = [0] * len(ids)
    if single:
        print(prompts[0], end="", flush=True)

    def on_token(i, t):
        counts[i] += 1
        if single:
            print(tok.decode([t]), end="", flush=True)

    t1 = time.time()
    outs = generate(core, ids, params, on_token)
    dt = time.time() - t1
    if single:
        print()
    else:
        for p, o in zip(prompts, outs):
            print(f"--- {p!r}\n{tok.decode(o)}")
    n = sum(counts)
    print(f"[{n} tokens in {dt:.2f}s, {n / max(dt, 1e-9):.1f} tok/s, batch {len(ids)}]", file=sys.stderr)


def resolve_config(config_path: str | None, *, model: str | None = None, port: int | None = None,
                   actors: int | None = None, ingress: str | None = None):
    """The cluster config ``expertpool serve`` runs: the file (default ./cluster.yaml if present, else
    built-in defaults) with the command line's overrides. Raises ConfigError."""
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
    if ingress:
        data.setdefault("serving", {})["ingress"] = ingress
    return parse_config(data, source=config_path or "defaults")


def _cmd_serve(a):
    from expertpool.platform.app import deploy
    cfg = resolve_config(a.config, model=a.model, port=a.port, actors=a.actors, ingress=a.ingress)
    url = deploy(cfg, address=a.address)
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


def _model_args(location: str | None):
    """The architecture of a checkpoint location (its config.json only), or of the embedded model."""
    from expertpool.model.args import ModelArgs
    from expertpool.model.embedded import ensure_embedded_model
    from expertpool.model.storage import resolve_model
    return ModelArgs.from_dir(resolve_model(location, weights=False) if location else ensure_embedded_model())


def _cmd_validate(a):
    from expertpool.platform.config import ConfigError, ConfigProblem, load_config
    from expertpool.platform.kuberay import pool_pod
    from expertpool.platform.memory_plan import train_memory_plan

    cfg = load_config(a.config)
    jobs = {a.job: cfg.get_job(a.job)} if a.job else dict(cfg.train.jobs)
    args = _model_args(cfg.model.path)
    problems = []
    try:
        derived = cfg.validate_against_model(args)  # the rules deploy and every replica run
    except ConfigError as e:  # reported together with the jobs' problems below
        problems += e.problems
    for name, job in jobs.items():
        try:
            dataset = job.check_dataset()  # the fine-tuning entry point's first check
        except ConfigError as e:
            problems += e.problems
        else:
            print(f"train.jobs.{name}.dataset: {dataset.path} ({dataset.format}, field {dataset.field})")
        # each job's memory plan, on its own base model
        plan = train_memory_plan(job, args if job.base_model == cfg.model.path else _model_args(job.base_model))
        print(f"train.jobs.{name}: {plan.describe()}")
        if plan.problem:
            problems.append(ConfigProblem(f"train.jobs.{name}", plan.problem))
    if problems:
        raise ConfigError(problems, cfg.source)
    pool = cfg.pool
    print(f"model: {cfg.model.name}: {args.n_routed_experts} routed experts, {args.num_hidden_layers} layers, "
          f"max_position_embeddings {args.max_position_embeddings}, KV {cfg.kv_bytes_per_token(args)} bytes per token")
    width = (f"{pool.width}" if pool.min_width == pool.max_width
             else f"{pool.width} (range {pool.min_width}..{pool.max_width})")
    print(f"pool: {width} actors per replica holding {derived['pool.expert_slots_per_actor']} expert slots "
          f"({pool.redundant_experts} redundant), backend {pool.resolved_backend()}")
    for name in jobs:
        print(f"train.jobs.{name}: {derived[f'train.jobs.{name}.experts_per_worker']} experts per worker")
    kv = cfg.serving.kv_cache
    print(f"serving.kv_cache: {derived['serving.kv_cache.num_blocks']} blocks of {kv.block_size} tokens per replica "
          f"(max_seq_len {cfg.serving.max_seq_len})")
    print(f"placement bundles per replica ({pool.placement_strategy}): {pool.placement_group_bundles()}")
    if "pool.memory_per_actor_gib" in derived:
        print(f"memory per actor: {derived['pool.memory_per_actor_gib']} GiB "
              f"of {pool.actor_resources.gpu_memory_gb} GiB (pool.actor_resources.gpu_memory_gb)")
    pod, pods = pool_pod(cfg)
    print(f"kuberay: {pods} pool pod(s) per replica, each offering {pod}")
    print(f"{a.config}: ok")


def _cmd_manifests(a):
    from expertpool.platform.config import load_config
    from expertpool.platform.kuberay import KINDS, manifests
    for p in manifests(load_config(a.config), a.out, kinds=tuple(a.kind) if a.kind else KINDS):
        print(f"wrote {p}")


def _cmd_schema(a):
    from expertpool.platform.config_schema import json_schema_text, reference_markdown
    sys.stdout.write(reference_markdown() if a.markdown else json_schema_text())


def _cmd_publish(a):
    import ray

    from expertpool.platform.patches import publish
    ray.init(address=a.address, include_dashboard=False, logging_level=logging.WARNING)
    model_id = publish(a.app, a.patch, a.domain)
    print(f"published {a.patch}: declared in app {a.app}'s user_config; every replica serves {model_id}")


def _cmd_scale(a):
    import ray

    from expertpool.platform.patches import scale
    ray.init(address=a.address, include_dashboard=False, logging_level=logging.WARNING)
    n = scale(a.app, a.actors, timeout_s=a.timeout)
    print(f"scaled app {a.app}: each of its {n} replica(s) runs {a.actors} expert actors (declared in its "
          "user_config, so new replicas start that wide too)")


def build_parser() -> argparse.ArgumentParser:
    # -v is accepted before and after the subcommand: the subcommands' copy defaults to SUPPRESS, so it
    # only sets the flag and never resets one given before the subcommand
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="debug logging, and the traceback of an error")
    p = argparse.ArgumentParser(prog="expertpool",
                                description="Serve and fine-tune DeepSeek-V3-class MoE models on Ray.")
    p.add_argument("-v", "--verbose", action="store_true", default=False,
                   help="debug logging, and the traceback of an error")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}", help="print the version")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, title="commands")

    def command(name, **kw):
        return sub.add_parser(name, parents=[verbose], **kw)

    s = command("init-model", help="write a random-weight checkpoint of a preset (with tokenizer)")
    s.add_argument("--preset", default="tiny", choices=list(PRESETS), help="architecture preset (default: tiny); "
                   "refused when it cannot be initialised in the available memory")
    s.add_argument("--out", required=True, help="output checkpoint directory")
    s.add_argument("--fp8", action="store_true", help="store projections as block-FP8 (e4m3 + weight_scale_inv)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.set_defaults(fn=_cmd_init_model)

    s = command("generate", help="in-process batched generation, streaming to stdout")
    s.add_argument("--model", help="checkpoint: directory, Hugging Face repo id, s3:// or gs:// (default: the "
                   "embedded tiny model)")
    s.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    s.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn with the chat template")
    s.add_argument("--max-tokens", type=int, default=32, help="new tokens per prompt (default 32)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    s.add_argument("--seed", type=int, default=None, help="sampling seed")
    s.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype (default auto: bfloat16 on CPUs with AVX-512 BF16 or AMX, else float32)")
    s.add_argument("--weight-dtype", default=None, choices=["fp8", "bf16", "fp32", "int8", "w8a8"],
                   help="resident weight format (default: as stored, non-fp8 in --dtype; int8: routed experts "
                   "weight-only int8; w8a8: int8, and the dense linears int8 with int8 activations on CPUs with "
                   "AVX512_VNNI, the fastest CPU decode, with more logit error)")
    s.set_defaults(fn=_cmd_generate)

    s = command("serve", help="deploy the OpenAI-compatible expert-parallel server on Ray Serve")
    s.add_argument("config", nargs="?", default=None,
                   help="cluster.yaml (default: ./cluster.yaml if present, else built-in defaults)")
    s.add_argument("--model", help="checkpoint: directory, Hugging Face repo id, s3:// or gs:// (overrides "
                   "model.path)")
    s.add_argument("--port", type=int, help="HTTP port (overrides serving.port)")
    s.add_argument("--address", help="Ray cluster address to connect to (default: start a local Ray)")
    s.add_argument("--actors", type=int, help="expert actors per replica (overrides pool.actors_per_replica)")
    s.add_argument("--ingress", choices=["proxy", "haproxy"], help="how HTTP reaches the replica (overrides "
                   "serving.ingress): Serve's Python proxy, or HAProxy straight to the replica's own HTTP server")
    s.add_argument("--no-block", action="store_true", help="deploy and return instead of running until Ctrl-C")
    s.set_defaults(fn=_cmd_serve)

    s = command("validate", help="check a cluster.yaml as serve, the replicas and the fine-tuning jobs would (schema, "
                "cross-field rules, the model's experts, length and KV cache, each job's dataset and memory plan) "
                "and print what it derives")
    s.add_argument("config", help="path to cluster.yaml")
    s.add_argument("--job", metavar="NAME", help="check only this training job (train.jobs.NAME) besides serving; "
                   "dataset paths resolve against the current directory, as in the job (default: every job)")
    s.set_defaults(fn=_cmd_validate)

    s = command("manifests", help="write KubeRay RayService/RayCluster/RayJob manifests from cluster.yaml, "
                       "one directory per deployment choice (each safe for `kubectl apply -f`)")
    s.add_argument("config", help="path to cluster.yaml")
    s.add_argument("--out", default="k8s", help="output directory (default k8s/): rayservice/, raycluster/ (with "
                   "the jobs that publish into it), rayjobs/ (jobs on their own clusters), serve-config/ (Serve "
                   "configs for `serve deploy`, no Kubernetes objects)")
    s.add_argument("--kind", action="append", choices=["rayservice", "raycluster", "rayjobs", "serve-config"],
                   help="write only these directories (repeatable; default: all)")
    s.set_defaults(fn=_cmd_manifests)

    s = command("schema", help="print the JSON Schema of cluster.yaml (docs/cluster.schema.json), or the reference "
                "tables of docs/operations.md")
    s.add_argument("--markdown", action="store_true", help="print the configuration reference tables instead")
    s.set_defaults(fn=_cmd_schema)

    s = command("publish", help="declare an ESFT expert patch in a running Serve app (its deployment's "
                       "user_config); every replica loads it without a restart")
    s.add_argument("--patch", required=True, help="patch written by a fine-tuning job: a directory every node "
                   "reads, or s3:// / gs://")
    s.add_argument("--app", default="expertpool", help="Serve application name (default expertpool)")
    s.add_argument("--domain", help="variant name (default: the patch manifest's domain)")
    s.add_argument("--address", default="auto", help="Ray cluster address (default auto)")
    s.set_defaults(fn=_cmd_publish)

    s = command("scale", help="change the number of expert-parallel actors of every replica of a running "
                       "Serve app, while it serves (within pool.actors_per_replica's range {min, max})")
    s.add_argument("--actors", type=int, required=True, help="expert actors per replica")
    s.add_argument("--app", default="expertpool", help="Serve application name (default expertpool)")
    s.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for every replica (default 600)")
    s.add_argument("--address", default="auto", help="Ray cluster address (default auto)")
    s.set_defaults(fn=_cmd_scale)
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        a.fn(a)
    except UserError as e:
        if a.verbose:
            traceback.print_exc()
        print(f"expertpool: error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
