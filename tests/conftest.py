import os

# No hub access anywhere in the tests: a download attempt must fail loudly, not hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def sparse_data():
    """Activations that really are sparse combinations of a hidden dictionary (D=32, 128 atoms)."""
    gen = torch.Generator().manual_seed(0)
    atoms = torch.randn(128, 32, generator=gen)
    atoms = atoms / atoms.norm(dim=-1, keepdim=True)

    def batch(n: int = 128) -> torch.Tensor:
        codes = torch.relu(torch.randn(n, 128, generator=gen) - 1.8) * 3
        return codes @ atoms

    return batch
