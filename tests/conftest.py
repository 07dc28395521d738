import os

# Tests never reach the Hub: everything they load is built here or shipped in the repo.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from pathlib import Path

import pytest
import torch

from tests.pretraining.conftest import train_toy_memorization_model, write_memorization_passages


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)
    yield


# The toy memorization models, trained once per session for the Goldfish test and the memorization audit.
@pytest.fixture(scope="session")
def memorization_passages(tmp_path_factory) -> tuple[Path, list[str]]:
    """The four training passages of the toy memorization models: (jsonl path, texts)."""
    return write_memorization_passages(tmp_path_factory.mktemp("memorization_train"), document_index=0)


@pytest.fixture(scope="session")
def heldout_memorization_passages(tmp_path_factory) -> tuple[Path, list[str]]:
    """Four passages by the same rules from the next document of each language, never trained on."""
    return write_memorization_passages(tmp_path_factory.mktemp("memorization_heldout"), document_index=1)


@pytest.fixture(scope="session")
def toy_memorization_models(tmp_path_factory, memorization_passages) -> dict[str, Path]:
    """{"standard": folder, "goldfish": folder}: the toy model trained on `memorization_passages` without and with
    the Goldfish loss."""
    corpus, _ = memorization_passages
    return {
        name: train_toy_memorization_model(tmp_path_factory.mktemp(f"toy_{name}"), corpus, goldfish)
        for name, goldfish in (("standard", False), ("goldfish", True))
    }
