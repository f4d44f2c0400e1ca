"""The training CLI: a real short run on the embedded model, and bad input that writes nothing."""

import json
import re
from pathlib import Path

import pytest
import torch
from dictionary_learning.utils import load_dictionary as dl_load_dictionary

from dictionary_learning_ext import load_dictionary
from experiments import train
from experiments.training.run_folder import run_status


def run_cli(*argv: str) -> int:
    return train.main(list(argv))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("cli") / "run"
    code = run_cli(
        "--architectures", "top_k", "vsae_topk", "standard", "vsae", "--k", "16", "--steps", "120",
        "--dict-size", "512", "--batch-size", "128", "--n-ctxs", "40", "--ctx-len", "64",
        "--refresh-batch-size", "20", "--eval-batches", "2", "--save-dir", str(save_dir),
    )
    assert code == 0
    return save_dir


def test_cli_writes_dictionary_learning_layout(trained_run: Path):
    names = sorted(p.name for p in trained_run.iterdir())
    assert names == ["metrics.json", "run.json", "trainer_0", "trainer_1", "trainer_2", "trainer_3"]
    for i, dict_class in enumerate(["AutoEncoderTopK", "VSAETopK", "AutoEncoder", "VSAE"]):
        trainer_dir = trained_run / f"trainer_{i}"
        assert (trainer_dir / "ae.pt").is_file()
        config = json.loads((trainer_dir / "config.json").read_text())
        assert config["trainer"]["dict_class"] == dict_class
        assert config["trainer"]["lm_name"] == "vsae-gelu-2l" and config["trainer"]["layer"] == 0
        assert config["buffer"]["ctx_len"] == 64
        ae, _ = load_dictionary(trainer_dir)
        assert type(ae).__name__ == dict_class and ae.dict_size == 512


def test_dictionary_learning_loader_round_trips_its_own_architectures(trained_run: Path):
    for i in (0, 2):
        theirs, _ = dl_load_dictionary(str(trained_run / f"trainer_{i}"), device="cpu")
        ours, _ = load_dictionary(trained_run / f"trainer_{i}")
        x = torch.randn(4, theirs.activation_dim)
        torch.testing.assert_close(theirs(x), ours(x))


def test_cli_metrics_table_values(trained_run: Path):
    rows = json.loads((trained_run / "metrics.json").read_text())
    assert [r["architecture"] for r in rows] == ["TopKTrainer", "VSAETopKTrainer", "StandardTrainer", "VSAETrainer"]
    for row in rows:
        assert 0.0 < row["frac_alive"] <= 1.0
        assert row["frac_variance_explained"] > 0.3, row  # 120 steps already explain a clear share
    assert rows[0]["l0"] == pytest.approx(16.0) and rows[1]["l0"] == pytest.approx(16.0)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--architectures", "top_kk"], "unknown architecture 'top_kk'"),
        (["--architectures", "vsae_topk:papr"], "no variant 'papr'"),
        (["--architectures", "top_k", "--steps", "0"], "--steps must be a positive integer"),
        (["--architectures", "top_k", "--dict-size", "0"], "--dict-size must be a positive integer"),
        (["--architectures", "top_k", "--dict-size", "64", "--k", "65"], "--k 65 is larger than --dict-size 64"),
        (["--architectures", "top_k", "--set", "beta"], "expected \\[ARCH.\\]KEY=VALUE"),
        (["--architectures", "top_k", "--set", "bta=1"], "match no field"),
        (["--architectures", "top_k", "--model", "no-such-model-xyz"], "no-such-model-xyz"),
        (["--architectures", "top_k", "--layer", "5"], "layer"),
    ],
)
def test_bad_input_fails_clearly_and_writes_nothing(tmp_path, capsys, argv, message):
    save_dir = tmp_path / "out"
    assert run_cli(*argv, "--save-dir", str(save_dir)) == 2
    err = capsys.readouterr().err
    assert "error:" in err
    assert re.search(message, err), err
    assert list(tmp_path.iterdir()) == []


def test_missing_save_dir_parent_is_an_error(tmp_path, capsys):
    assert run_cli("--architectures", "top_k", "--save-dir", str(tmp_path / "missing" / "run")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_existing_save_dir_needs_overwrite(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert run_cli("--architectures", "top_k", "--save-dir", str(tmp_path / "run")) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_finished_run_is_skipped_only_by_an_explicit_resume(trained_run: Path, capsys):
    assert run_status(trained_run) == "finished"
    rows = json.loads((trained_run / "metrics.json").read_text())
    stamp = (trained_run / "trainer_0" / "ae.pt").stat().st_mtime_ns
    assert train.run(train.parse_args(["--resume", str(trained_run)])) == rows
    assert (trained_run / "trainer_0" / "ae.pt").stat().st_mtime_ns == stamp  # nothing retrained
    # Without --resume the same arguments refuse the existing folder instead of skipping it.
    stored = json.loads((trained_run / "run.json").read_text())["argv"]
    assert run_cli(*stored) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_parse_args_records_the_options_given(tmp_path):
    args = train.parse_args(["--architectures", "top_k", "--steps", "2000", "--save-dir", str(tmp_path / "r")])
    assert set(args.given) == {"architectures", "steps", "save_dir"}  # --steps 2000 is the default, yet given
    assert run_status(tmp_path / "r") == "missing"
