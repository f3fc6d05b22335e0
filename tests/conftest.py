import os

import pytest

# The package comes from the editable install (requirements.txt); pytest.ini puts the
# checkout (pretrain_*.py, tests) and tools/ on the path of this process.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def byte_corpus(tmp_path_factory):
    from tests.e2e import build_byte_corpus

    return build_byte_corpus(tmp_path_factory.mktemp("corpus"))
