import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from helpers import FAMILIES  # noqa: E402


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param
