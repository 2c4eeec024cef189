"""The Ray layer: the cluster.yaml schema, expert-parallel worker actors, the engine, the Serve app,
autoscaling and KubeRay manifests.

Public API: ``load_config`` (read and validate a cluster.yaml) and ``build_app`` (the Serve
application; also the ``import_path`` target of a Serve config). They are resolved on first access
(module ``__getattr__``), so ``import expertpool.platform`` imports neither pydantic nor Ray.
"""

from typing import TYPE_CHECKING, Any

__all__ = ["build_app", "load_config"]

if TYPE_CHECKING:
    from expertpool.platform.app import build_app
    from expertpool.platform.config import load_config


def __getattr__(name: str) -> Any:
    if name == "load_config":
        from expertpool.platform.config import load_config
        return load_config
    if name == "build_app":
        from expertpool.platform.app import build_app
        return build_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
