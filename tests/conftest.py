import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from helpers import FAMILIES  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def private_vistok_cache(tmp_path_factory):
    """Converted models (SmolLM2) go to a folder of this test session, not the user's cache: the first load in
    the session converts, the later ones read the copy."""
    previous = os.environ.get("VISTOK_CACHE")
    os.environ["VISTOK_CACHE"] = str(tmp_path_factory.mktemp("vistok_cache"))
    yield
    if previous is None:
        os.environ.pop("VISTOK_CACHE", None)
    else:
        os.environ["VISTOK_CACHE"] = previous


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param
