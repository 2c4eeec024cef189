"""What every section of the ``cluster.yaml`` schema shares: the error type, the closed base model
that turns pydantic's errors into ``field: problem; fix`` lines, and the resource bundle of an actor
or a train worker.

Rules raised inside validators use ``rule_error(field, problem, fix)``; ``platform.config`` turns
them (and pydantic's own errors) into ``ConfigProblem`` lines of one ``ConfigError``. Import these
names from ``expertpool.platform.config``, which re-exports them; this module exists so that the
sections in their own modules (``platform.pool_config``, ``serving_config``, ``train_config``) and the
rest of the schema share them without a cycle.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from expertpool.errors import UserError

GIB = 1024**3
RULE_ERROR_TYPE = "expertpool_rule"  # pydantic error type of our own cross-field rules (carries field/problem/fix)
K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # RFC 1123 label: job names end up in pod names
DOMAIN = re.compile(r"^[A-Za-z0-9._-]+$")  # a fine-tuned variant's name, served as MODEL:DOMAIN


class ConfigProblem(NamedTuple):
    field: str  # dotted path from the top of cluster.yaml, e.g. "serving.autoscaling.max_replicas"
    message: str  # "problem; fix"


class ConfigError(UserError, ValueError):
    """A user-fixable config problem. ``str()`` gives one ``source: field: problem; fix`` line per problem."""

    def __init__(self, problems: list[ConfigProblem], source: str = "cluster.yaml"):
        self.problems = list(problems)
        self.source = source
        super().__init__("\n".join(f"{source}: {p.field}: {p.message}" if p.field else f"{source}: {p.message}"
                                   for p in self.problems))


def rule_error(field: str, problem: str, fix: str) -> PydanticCustomError:
    """An error raised from a validator; ``field`` is relative to the model (or "" in a field validator)."""
    return PydanticCustomError(RULE_ERROR_TYPE, "{field}: {problem}; {fix}",
                               {"field": field, "problem": problem, "fix": fix})


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        """A section whose keys are all commented out (``serving:``) parses as null: read it as empty."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items()
                    if not (v is None and k in cls.model_fields and _is_section(cls.model_fields[k].annotation))}
        return data


def _is_section(annotation: Any) -> bool:
    return (isinstance(annotation, type) and issubclass(annotation, BaseModel)) or getattr(
        annotation, "__origin__", None) is dict


class ActorResources(Closed):
    cpu: float = Field(1.0, ge=0, description="Logical CPUs reserved per actor (Ray `num_cpus`; fractions allowed).")
    gpu: float = Field(0.0, ge=0, description="GPUs reserved per actor (Ray `num_gpus`; fractions allowed).")
    memory_gb: float | None = Field(None, gt=0, description="Memory reserved per actor in GiB (Ray `memory`). "
                                    "None = no memory reservation.")
    gpu_memory_gb: float | None = Field(None, gt=0, description="Memory of one of its GPUs in GiB (80 for an H100 "
                                        "80GB). A training job with GPUs must set it: `expertpool validate` checks "
                                        "the job's per-worker memory plan against gpu x gpu_memory_gb.")
    custom: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources per actor, e.g. "
                                     "{accelerator_type_H100: 0.001} or a node label resource.")

    @model_validator(mode="after")
    def _check(self) -> ActorResources:
        for key, value in self.custom.items():
            if key in ("CPU", "GPU", "memory", "object_store_memory"):
                raise rule_error(f"custom.{key}", "is a built-in resource", f"use the `{key.lower().split('_')[0]}` "
                            "field instead of `custom`" if key != "object_store_memory" else "remove it")
            if value < 0:
                raise rule_error(f"custom.{key}", f"must be >= 0, got {value}", "set a non-negative amount")
        if not any(v > 0 for v in self.bundle().values()):
            raise rule_error("cpu", "the actor requests no resources at all (Ray rejects empty placement bundles)",
                        "set cpu (or gpu) above 0")
        return self

    def bundle(self) -> dict[str, float]:
        """Placement-group bundle (Ray resource names); also valid as Ray Train ``resources_per_worker``."""
        out: dict[str, float] = {}
        if self.cpu:
            out["CPU"] = self.cpu
        if self.gpu:
            out["GPU"] = self.gpu
        if self.memory_gb:
            out["memory"] = float(int(self.memory_gb * GIB))
        out.update({k: v for k, v in self.custom.items() if v})
        return out

    def ray_options(self) -> dict[str, Any]:
        """Keyword arguments for ``ActorClass.options(...)`` reserving exactly this bundle."""
        out: dict[str, Any] = {"num_cpus": self.cpu, "num_gpus": self.gpu}
        if self.memory_gb:
            out["memory"] = int(self.memory_gb * GIB)
        if self.custom:
            out["resources"] = dict(self.custom)
        return out


def check_location(v: str | None) -> str | None:
    """A field validator for checkpoint/patch/output locations (``model.storage`` specs)."""
    from expertpool.model import storage

    if v is not None:
        try:
            storage.check(v)  # syntax only: where a relative `org/name` lives is decided where it is read
        except storage.StorageError as e:
            raise rule_error("", str(e), "fix the location") from None
    return v


def divisor_message(n_experts: int, parts: int, field: str, what: str) -> str:
    divisors = [d for d in range(1, n_experts + 1) if n_experts % d == 0]
    shown = ", ".join(map(str, divisors[:10])) + (", ..." if len(divisors) > 10 else "")
    return (f"{n_experts} routed experts do not split evenly over {parts} {what}; "
            f"set {field} to a divisor of {n_experts} ({shown})")
