import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import FAMILIES  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: one intra-op thread per worker, N workers on N cores
    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def private_vistok_cache(tmp_path_factory):
    """Converted models (SmolLM2, about 540 MB) go to a folder of this test session, not the user's cache, and are
    deleted at its end: the first load in the session converts, the later ones read the copy."""
    folder = tmp_path_factory.mktemp("vistok_cache")
    with pytest.MonkeyPatch.context() as patched:
        patched.setenv("VISTOK_CACHE", str(folder))
        yield
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param
