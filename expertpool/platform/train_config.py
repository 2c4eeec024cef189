"""The ``train:`` section of ``cluster.yaml``: fine-tuning jobs (``train.jobs.<name>``).

Part of the schema in ``platform.config`` (which re-exports these names and embeds ``TrainConfig``
in ``ClusterConfig``); a separate module because the job schema is a room of its own: data set,
ESFT selection, optimizer, elastic worker range, checkpoints, publishing. Same contract as the rest
of the schema: closed models, every field documented, derived defaults (``esft.p``, ``output_dir``,
``domain``) filled at validation. Rules that need the model architecture are
``TrainJobConfig.resolved_experts_per_worker`` (and ``ClusterConfig.validate_against_model``); the
ones that touch the file system are ``TrainJobConfig.check_dataset``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, model_validator

from pydantic import field_validator

from expertpool.model import storage
from expertpool.platform.config_base import (DOMAIN, K8S_NAME, ActorResources, Closed, ConfigError, ConfigProblem,
                                             check_location, divisor_message, rule_error)

DEFAULT_STORAGE = "~/expertpool/runs"  # where relative output_dir go when train.storage_path is unset
_SUFFIX_FORMAT = {".jsonl": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


class DatasetConfig(Closed):
    path: str = Field(description="Training data file (or directory of files). Relative paths are relative to "
                      "the working directory of the job, i.e. the repository root.")
    format: Literal["jsonl", "parquet"] | None = Field(None, description="File format. None = from the suffix "
                                                       "(.jsonl, .parquet/.pq).")
    field: Literal["messages", "text"] | None = Field(None, description="Record field holding the example: "
                                                      "`messages` (chat turns) or `text`. None = detected from the "
                                                      "first record by check_dataset().")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Fraction of records held out for evaluation.")

    @model_validator(mode="after")
    def _infer(self) -> DatasetConfig:
        if self.format is None:
            suffix = Path(self.path).suffix.lower()
            if suffix in _SUFFIX_FORMAT:
                self.format = _SUFFIX_FORMAT[suffix]  # type: ignore[assignment]
            elif suffix:
                raise rule_error("format", f"cannot infer the format from suffix '{suffix}'",
                            "set dataset.format to jsonl or parquet")
        return self


class EsftConfig(Closed):
    scoring: Literal["gate", "token"] = Field("token", description="ESFT expert relevance score: `token` "
                                              "(selection ratio, ESFT-Token) or `gate` (mean gate value, ESFT-Gate).")
    p: float | None = Field(None, description="Cumulative relevance threshold in (0, 1]: per layer, train the "
                            "fewest experts whose scores, normalized to sum to 1 over the layer, sum to >= p. "
                            "None = the paper's value: 0.2 (token), 0.1 (gate). In gate mode p is the share of "
                            "the layer's gate weight covered; DeepSeek's published V2-Lite gate scores summed to "
                            "0.26-0.53 per layer, so their p = 0.1 covered 19-38% of it (p of about 0.2-0.4 "
                            "here selects as much).")
    score_tokens: int = Field(16384, ge=1, description="Training tokens sampled for the relevance probe "
                              "(forward passes only; the paper uses 32 x 4096).")

    @model_validator(mode="after")
    def _check(self) -> EsftConfig:
        if self.p is None:
            self.p = 0.2 if self.scoring == "token" else 0.1
        if not 0 < self.p <= 1:
            raise rule_error("p", f"must be in (0, 1], got {self.p}",
                        "set p to a fraction such as 0.2 (token scoring) or 0.1 (gate scoring)")
        return self


class MtpDistillConfig(Closed):
    prompt_tokens: int = Field(32, ge=1, description="Mode mtp: tokens of each training row kept as the prompt; "
                               "the base model continues it greedily to seq_len, and the MTP module learns the "
                               "base's greedy next token on the whole row (self-distillation). Must be below "
                               "seq_len.")


class TrainJobConfig(Closed):
    base_model: str | None = Field(None, description="Checkpoint to fine-tune: any location model.path accepts "
                                   "(directory, Hugging Face repo id, s3:// / gs://); each worker fetches only the "
                                   "dense shards and those of its experts. None = the embedded tiny model.")
    dataset: DatasetConfig = Field(description="Training data.")
    mode: Literal["esft", "full", "mtp"] = Field("esft", description="`esft`: train only the routed experts "
                                                 "relevant to the data (everything else frozen; with "
                                                 "mtp_loss_weight > 0 also the MTP module); `full`: train all "
                                                 "weights; `mtp`: train only the MTP module (the speculative "
                                                 "draft head) on the base's own greedy outputs, main model frozen; "
                                                 "its patch replaces the served MTP module in place.")
    esft: EsftConfig = Field(default_factory=EsftConfig, description="Expert selection (mode esft only).")
    mtp: MtpDistillConfig = Field(default_factory=MtpDistillConfig, description="Self-distillation of the MTP "
                                  "module (mode mtp only).")
    lr: float = Field(1e-5, gt=0, description="Peak learning rate (AdamW).")
    steps: int = Field(500, ge=1, description="Optimizer steps.")
    batch_size: int = Field(32, ge=1, description="Global batch size in sequences; must divide by workers (so "
                            "every worker count in the elastic range gets at least one sequence).")
    seq_len: int = Field(4096, ge=1, description="Training sequence length in tokens (longer examples are truncated).")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warmup steps (<= steps).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float | None = Field(1.0, gt=0, description="Global gradient-norm clip. None = no clipping.")
    workers: int = Field(2, ge=1, description="Ray Train workers; routed experts are sharded over them. With "
                         "min_workers, the most workers (the size Ray Train asks for and grows back to).")
    min_workers: int | None = Field(None, ge=1, description="Fewest workers the job runs on (Ray Train elastic "
                                    "range min_workers..workers): after a failure Ray Train restarts on the "
                                    "workers it can get from the latest checkpoint, which any worker count restores; "
                                    "rank r of W then owns routed experts [r*E//W, (r+1)*E//W). None = always "
                                    "exactly `workers`.")
    experts_per_worker: int | None = Field(None, ge=1, description="Routed experts per worker. None = "
                                           "n_routed_experts / workers; if set, must equal it.")
    worker_resources: ActorResources = Field(default_factory=ActorResources, description="Resources per train worker.")
    zero_stage: Literal[0, 1, 2] = Field(1, description="DeepSpeed ZeRO stage for the non-expert (data-parallel) "
                                         "parameters.")
    mtp_loss_weight: float = Field(0.0, ge=0, description="Weight of the multi-token-prediction loss; 0 = off. "
                                   "When > 0 the MTP module trains too: in mode full with everything, in mode esft "
                                   "its non-expert tensors (router excepted) plus the ESFT-selected experts of its "
                                   "MoE layer, all saved in the patch. Mode mtp ignores it (its loss is MTP only).")
    balance_loss_alpha: float = Field(0.0001, ge=0, description="Sequence-wise auxiliary balance loss weight (alpha).")
    router_bias_rate: float = Field(0.0, ge=0, description="Aux-loss-free router bias update speed (gamma). "
                                    "0 = routing frozen, as in ESFT.")
    checkpoint_every: int = Field(100, ge=0, description="Steps between checkpoints; 0 = only at the end.")
    output_dir: str | None = Field(None, description="Where the run's checkpoints (Ray Train storage_path), "
                                   "train_log.jsonl, summary.json and result (patch/ or model/) go: an absolute path "
                                   "every train node reaches, an s3:// or gs:// URI, or a path relative to "
                                   "train.storage_path (never the job's working directory, a temporary copy). "
                                   "None = the job name.")
    max_failures: int = Field(2, ge=-1, description="Worker-group restarts from the last checkpoint before the job "
                              "fails (Ray Train FailureConfig.max_failures; -1 = unlimited).")
    publish_to: str | None = Field(None, description="Serving app (serving.app_name) to hot-swap the result into at "
                                   "the end: an ESFT patch is served as `MODEL:DOMAIN`, an MTP patch replaces the "
                                   "app's MTP module in place. None = only write output_dir.")
    domain: str | None = Field(None, description="Variant name; the result is served as `<model.name>:<domain>`. "
                               "None = the job name.")

    _name: str = PrivateAttr("")  # set by TrainConfig; names the job in error messages
    _source: str = PrivateAttr("cluster.yaml")  # set by parse_config

    def _error(self, field: str, message: str) -> ConfigError:
        return ConfigError([ConfigProblem(f"train.jobs.{self._name}.{field}" if self._name else field, message)],
                           self._source)

    @field_validator("base_model", "output_dir")
    @classmethod
    def _location(cls, v: str | None) -> str | None:
        return check_location(v)

    @model_validator(mode="after")
    def _check(self) -> TrainJobConfig:
        if self.output_dir is not None and self.output_dir.startswith(storage.HF_SCHEME):
            raise rule_error("output_dir", f"'{self.output_dir}' is a Hugging Face repo, and outputs cannot go there",
                             "use a path, s3:// or gs://")
        gpu = self.worker_resources.gpu
        if gpu and (gpu != int(gpu) or (self.workers > 1 and gpu != 1)):
            raise rule_error("worker_resources.gpu", f"({gpu}) is not one whole GPU per worker; NCCL runs one rank "
                             "per GPU", "set worker_resources.gpu to 1 (or 0 for CPU training)")
        if gpu and self.worker_resources.gpu_memory_gb is None:
            raise rule_error("worker_resources.gpu_memory_gb", "is unset, so the job's memory plan cannot be checked "
                             "before it starts", "set it to the memory of one GPU in GiB (80 for an H100 80GB)")
        if self.warmup_steps > self.steps:
            raise rule_error("warmup_steps", f"({self.warmup_steps}) exceeds steps ({self.steps})",
                        f"set warmup_steps to at most {self.steps}")
        if self.mode == "mtp" and self.mtp.prompt_tokens >= self.seq_len:
            raise rule_error("mtp.prompt_tokens", f"({self.mtp.prompt_tokens}) leaves no room for the base's "
                             f"continuation in seq_len ({self.seq_len})",
                             f"set mtp.prompt_tokens below {self.seq_len}, such as {max(1, self.seq_len // 4)}")
        if self.batch_size % self.workers:
            raise rule_error("batch_size",
                             f"{self.batch_size} sequences do not split evenly over {self.workers} workers",
                        f"set batch_size to a multiple of {self.workers}")
        if self.min_workers is not None and self.min_workers > self.workers:
            raise rule_error("min_workers", f"({self.min_workers}) exceeds workers ({self.workers}), the most workers",
                        f"set min_workers to at most {self.workers}, or raise workers")
        if self.domain is not None and not DOMAIN.match(self.domain):
            raise rule_error("domain", f"'{self.domain}' has characters outside [A-Za-z0-9._-]",
                        "set domain to a short name such as 'law' or 'math-v2'")
        return self

    @property
    def worker_range(self) -> tuple[int, int]:
        """(fewest, most) Ray Train workers; equal when the job is not elastic."""
        return (self.workers if self.min_workers is None else self.min_workers, self.workers)

    def resolved_experts_per_worker(self, n_routed_experts: int) -> int:
        problem = self.experts_problem(n_routed_experts)
        if problem:
            raise self._error(*problem)
        return n_routed_experts // self.workers

    def experts_problem(self, n: int, prefix: str = "") -> tuple[str, str] | None:
        if n % self.workers:
            return prefix + "workers", divisor_message(n, self.workers, "workers", "workers")
        if self.experts_per_worker is not None and self.experts_per_worker != n // self.workers:
            return (prefix + "experts_per_worker", f"{self.experts_per_worker} x {self.workers} workers != "
                    f"{n} routed experts; set experts_per_worker to {n // self.workers} or remove it")
        return None

    def check_dataset(self, base_dir: str | Path | None = None) -> DatasetConfig:
        """Check the dataset exists and is non-empty; return it with ``format`` and ``field`` filled in.

        Run before any worker starts. Relative paths resolve against ``base_dir`` (default: the cwd)."""
        path = Path(self.dataset.path)
        if base_dir is not None and not path.is_absolute():
            path = Path(base_dir) / path
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        if not path.exists():
            raise self._error("dataset.path", f"'{path}' does not exist; create it or set dataset.path to an "
                              "existing .jsonl or .parquet file")
        if not files or all(f.stat().st_size == 0 for f in files):
            raise self._error("dataset.path", f"'{path}' is empty; put training records in it or point "
                              "dataset.path at a non-empty file")
        fmt = self.dataset.format or _SUFFIX_FORMAT.get(files[0].suffix.lower())
        if fmt is None:
            raise self._error("dataset.format", f"cannot infer the format of '{files[0]}'; set dataset.format "
                              "to jsonl or parquet")
        field = self.dataset.field or _detect_field(files[0], fmt, self._error)
        return self.dataset.model_copy(update={"format": fmt, "field": field})


def _detect_field(path: Path, fmt: str, error: Callable[[str, str], ConfigError]) -> str:
    if fmt == "parquet":
        import pyarrow.parquet as pq  # deferred: only needed to sniff parquet data sets

        keys = set(pq.read_schema(path).names)
    else:
        with path.open(encoding="utf-8") as fh:
            line = next((ln for ln in fh if ln.strip()), "")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise error("dataset.path", f"first record of '{path}' is not JSON ({e.msg}); "
                        "write one JSON object per line") from None
        keys = set(record) if isinstance(record, dict) else set()
    for candidate in ("messages", "text"):
        if candidate in keys:
            return candidate
    raise error("dataset.field", f"records in '{path}' have neither 'messages' nor 'text' "
                f"(found {sorted(keys)}); rename the field or set dataset.field")


class TrainConfig(Closed):
    storage_path: str | None = Field(None, description="Where relative output_dir resolve: a directory the train "
                                     "nodes share, or an s3:// or gs:// URI. None = ~/expertpool/runs on the node "
                                     "that runs the job's driver (the head node under `ray job submit`).")
    jobs: dict[str, TrainJobConfig] = Field(default_factory=dict, description="Fine-tuning jobs by name; run one "
                                            "with `python -m expertpool.jobs.finetune --config cluster.yaml "
                                            "--job NAME`.")

    def output_location(self, job_name: str, *, expand_home: bool = True) -> str:
        """The job's output_dir as an absolute path or a URI: a relative one goes under storage_path
        (default ``DEFAULT_STORAGE``). ``~`` is expanded here, on the node that runs the driver, unless
        ``expand_home`` is False (where it will expand elsewhere, say in a pod)."""
        out = self.jobs[job_name].output_dir
        loc = storage.parse(out, hub=False)
        home = (lambda p: p.expanduser()) if expand_home else (lambda p: p)
        if loc.remote or Path(out).expanduser().is_absolute():
            return out if loc.remote else str(home(Path(out)))
        root = storage.parse(self.storage_path or DEFAULT_STORAGE, hub=False)
        return root.join(out) if root.remote else str(home(Path(root.path)) / out)

    @field_validator("storage_path")
    @classmethod
    def _location(cls, v: str | None) -> str | None:
        v = check_location(v)
        if v is not None and v.startswith(storage.HF_SCHEME):
            raise rule_error("", f"'{v}' is a Hugging Face repo, and outputs cannot go there",
                             "use an absolute path, s3:// or gs://")
        return v

    @model_validator(mode="after")
    def _derive(self) -> TrainConfig:
        for name, job in self.jobs.items():
            if not K8S_NAME.match(name) or len(name) > 40:
                raise rule_error(f"jobs.{name}", "job names become Kubernetes object names",
                            "use lowercase letters, digits and '-' (at most 40 characters), e.g. 'law-esft'")
            job._name = name
            if job.output_dir is None:
                job.output_dir = name
            if job.domain is None:
                job.domain = name
        return self
