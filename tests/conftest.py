"""Shared fixtures. ``ray_cluster``: ONE local Ray instance for the whole test session, started on
first use only (``ray.init`` costs ~10 s), so unit tests never pay for it. ``address="local"``
always starts a private instance, never attaching to another cluster found on the machine. It has 3
of the custom resource ``expertpool_test_slot``: a job whose workers need one each can get 3
workers and no more (the elastic fine-tuning test). ``tiny_dir``: one embedded tiny model per session,
in a temporary cache (the fine-tuning and patch tests). ``s3``: one S3-compatible server on loopback
per session (``tests/s3.py``), its endpoint and keys in the environment before the Ray cluster starts,
so Ray workers reach it too."""

import pytest


@pytest.fixture(scope="session")
def s3():
    from tests.s3 import S3Server

    server = S3Server()
    server.install()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3):
    import ray

    started = not ray.is_initialized()
    if started:
        from expertpool.platform.proxy import set_proxy_env

        set_proxy_env()  # Serve's proxy-level errors as OpenAI JSON, as `expertpool serve` does
        ray.init(address="local", num_cpus=8, resources={"expertpool_test_slot": 3}, include_dashboard=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from expertpool.model.embedded import ensure_embedded_model

    return ensure_embedded_model(tmp_path_factory.mktemp("expertpool-cache"))
