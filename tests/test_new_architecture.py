"""Adding an architecture is one file plus one registration: a toy architecture defined here, registered
for the duration of the test, goes through the train CLI, ``load_dictionary``, the SAEBench wrapper and
the export, which refuses it because SAELens has no equivalent of its encoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn as nn

from dictionary_learning_ext import ARCHITECTURES, load_dictionary
from dictionary_learning_ext.config import SAETrainerConfig
from dictionary_learning_ext.errors import ExportError
from dictionary_learning_ext.linear_decoder import LinearDecoderDictionary
from dictionary_learning_ext.registry import register_trainer
from dictionary_learning_ext.trainer_base import ExtTrainer


# --- the one file of a new architecture: dictionary, config, trainer ----------------------------
class TanhSAE(LinearDecoderDictionary):
    """Codes tanh(W_enc (x - b_dec) + b_enc): dense, bounded, signed (nothing SAELens has)."""

    def __init__(self, activation_dim: int, dict_size: int):
        super().__init__()
        self.activation_dim, self.dict_size = activation_dim, dict_size
        self.encoder = nn.Linear(activation_dim, dict_size)
        self.decoder = nn.Linear(dict_size, activation_dim, bias=False)
        self.decoder.weight.data = self.decoder.weight.data / self.decoder.weight.data.norm(dim=0, keepdim=True)
        self.b_dec = nn.Parameter(torch.zeros(activation_dim))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.encoder(x - self.b_dec))

    def scale_biases(self, scale: float) -> None:
        raise NotImplementedError


@dataclass
class TanhSAEConfig(SAETrainerConfig):
    l1_penalty: float = 0.01
    """L1 on the codes."""


class TanhSAETrainer(ExtTrainer):
    config_class = TanhSAEConfig
    dict_class = TanhSAE

    @staticmethod
    def dictionary_kwargs(cfg: TanhSAEConfig) -> dict[str, Any]:
        return dict(activation_dim=cfg.activation_dim, dict_size=cfg.dict_size)

    def compute_loss(self, x: torch.Tensor, step: int):
        f_BF = self.ae.encode(x)
        x_hat_BD = self.ae.decode(f_BF)
        recon = (x - x_hat_BD).square().sum(dim=-1).mean()
        l1 = f_BF.abs().sum(dim=-1).mean()
        return recon + self.cfg.l1_penalty * l1, x_hat_BD, f_BF, {"l2_loss": recon, "l1_loss": l1}


@pytest.fixture
def toy_architecture():
    arch = register_trainer("toy_tanh", TanhSAETrainer)  # the one registration
    yield arch
    del ARCHITECTURES[arch.name]


def test_a_new_architecture_goes_through_every_entry_point(toy_architecture, tmp_path, capsys):
    from experiments import train
    from saebench_adapters.export import export_run
    from saebench_adapters.wrappers import load_sae

    save_dir = tmp_path / "run"
    code = train.main(["--architectures", "toy_tanh", "top_k", "--k", "8", "--dict-size", "64", "--steps", "20",
                       "--batch-size", "32", "--n-ctxs", "8", "--ctx-len", "16", "--refresh-batch-size", "8",
                       "--eval-batches", "1", "--save-dir", str(save_dir)])
    assert code == 0, capsys.readouterr().err
    ae, config = load_dictionary(save_dir / "trainer_0")
    assert isinstance(ae, TanhSAE)
    assert (config["trainer"]["architecture"], config["trainer"]["trainer_class"]) == ("toy_tanh", "TanhSAETrainer")

    sae = load_sae(save_dir / "trainer_0")
    x = torch.randn(5, ae.activation_dim)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), ae.encode(x))
        torch.testing.assert_close(sae.decode(sae.encode(x)), ae(x))
    torch.testing.assert_close(sae.W_enc.detach(), ae.encoder.weight.detach().T)

    with pytest.raises(ExportError, match="no SAELens equivalent"):
        export_run(save_dir, tmp_path / "export")
    assert not (tmp_path / "export").exists()
