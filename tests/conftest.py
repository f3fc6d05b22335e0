import os
import sys

import pytest

# Tests import the package from the checkout and spawn ranks that do the same.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def byte_corpus(tmp_path_factory):
    from tests.e2e import build_byte_corpus

    return build_byte_corpus(tmp_path_factory.mktemp("corpus"))
