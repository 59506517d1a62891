from __future__ import annotations

import pytest

from fp_ray import TINY_CHECKPOINT
from fp_ray.models import cached_components


@pytest.fixture(scope="session")
def components():
    """The tiny checkpoint, loaded once for the whole run."""
    return cached_components(str(TINY_CHECKPOINT))
