"""Fixtures for the fine-tuning tests: one embedded tiny model per session, in a temporary cache."""

import pytest


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from expertpool.model.embedded import ensure_embedded_model

    return ensure_embedded_model(tmp_path_factory.mktemp("expertpool-cache"))
