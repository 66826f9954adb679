import sys
from pathlib import Path

import pytest

# tests import their helpers (formulas.py, tiny_models.py, tiny_dit.py) as plain modules
sys.path.insert(0, str(Path(__file__).parent))

from tiny_dit import tiny_flux_pipeline, tiny_sd3_pipeline  # noqa: E402
from tiny_models import tiny_sd15_pipeline, tiny_sdxl_pipeline  # noqa: E402


# One tiny pipeline per test module; tests that change it work on a deep copy.
@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return tiny_sd15_pipeline(tmp_path_factory.mktemp("sd15"))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return tiny_flux_pipeline(tmp_path_factory.mktemp("flux"))


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3"))
