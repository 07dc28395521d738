import pytest

from tests.helpers import tiny_bpe_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_bpe_tokenizer()


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Each test gets its own `datasets` cache, so no test reads what another one cached."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")
