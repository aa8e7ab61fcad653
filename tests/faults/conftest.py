"""Fault tests run a real daemon with --test-faults; same fixtures as tests/integration."""
import pytest

from tests.integration.conftest import nss, pytest_collection_modifyitems  # noqa: F401
from tests.integration.helpers import running_cluster


@pytest.fixture
def cluster(nss, tmp_path):
    with running_cluster(nss, tmp_path, daemon_args=["--test-faults"]) as c:
        yield c
