"""saebench_adapters.export and .loaders: SAEBench's dictionary_learning path and SAELens copies."""

import json
from pathlib import Path

import pytest
import torch
from sae_lens import SAE

import dictionary_learning_ext.io as atomic
from saebench_adapters.export import ExportError, export_run, main as export_main
from saebench_adapters.loaders import load_dictionary_learning_registered_sae, register_with_saebench
from saebench_adapters.wrappers import load_sae
from test_saebench_wrappers import D, F, make_trainer, perturb


def save_trainer(folder: Path, trainer) -> None:
    """What dictionary_learning's trainSAE writes for one trainer."""
    folder.mkdir(parents=True)
    torch.save(trainer.ae.state_dict(), folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": trainer.config, "buffer": {"d_submodule": D}}))


def make_run(root: Path, specs: list[tuple[str, dict]]) -> Path:
    run = root / "run"
    for i, (arch, overrides) in enumerate(specs):
        trainer = make_trainer(arch, **overrides)
        perturb(trainer.ae, seed=i)
        save_trainer(run / f"trainer_{i}", trainer)
    return run


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


EXPRESSIBLE = [
    ("top_k", {}, "topk"),
    ("vsae_topk", {}, "topk"),  # relu mean, value selection
    ("vsae_topk", {"select_by": "magnitude"}, "topk"),  # relu: magnitude == value
    ("vsae_topk", {"mean_activation": "identity", "select_by": "magnitude"}, "abstopk"),  # signed codes
    ("vsae", {}, "standard"),
    ("standard", {}, "standard"),
    ("batch_top_k", {}, "jumprelu"),  # threshold set by perturb()
]


def test_export_writes_both_layouts_and_saelens_reproduces_every_sae(tmp_path):
    run = make_run(tmp_path, [(a, o) for a, o, _ in EXPRESSIBLE])
    out = tmp_path / "export"
    manifest = export_run(run, out, repo_id="someone/vsae-saes")
    assert [e["saelens_architecture"] for e in manifest["saes"]] == [arch for _, _, arch in EXPRESSIBLE]
    x = torch.randn(64, D) * 2
    for i, entry in enumerate(manifest["saes"]):
        loc = entry["location"]
        assert loc == f"run/trainer_{i}"
        # weights where hf_hub_download(local_dir="downloaded_saes") puts them, config where the
        # dispatcher reads it
        assert (out / "downloaded_saes" / loc / "ae.pt").read_bytes() == (run / f"trainer_{i}" / "ae.pt").read_bytes()
        assert (out / "downloaded_saes" / loc / "config.json").is_file()
        assert (out / "downloaded_saes" / "someone_vsae-saes" / loc / "config.json").is_file()
        ours = load_sae(run / f"trainer_{i}")
        theirs = SAE.load_from_disk(out / entry["saelens_path"])
        assert theirs.cfg.architecture() == entry["saelens_architecture"]
        assert theirs.cfg.metadata.hook_name == "blocks.0.hook_resid_post"
        with torch.no_grad():
            torch.testing.assert_close(theirs.encode(x), ours.encode(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(theirs.decode(theirs.encode(x)), ours(x), rtol=1e-5, atol=1e-5)
    assert json.loads((out / "export_manifest.json").read_text())["repo_id"] == "someone/vsae-saes"
    assert not [p for p in files_under(out) if p.name.endswith(".tmp")]


def test_saebench_dictionary_learning_loader_loads_exported_vsae_topk(tmp_path, monkeypatch):
    import sae_bench.custom_saes.run_all_evals_dictionary_learning_saes as dl_saes

    run = make_run(tmp_path, [("vsae_topk", {}), ("top_k", {})])
    out = tmp_path / "export"
    export_run(run, out, repo_id="someone/vsae-saes")
    added = register_with_saebench()
    assert {"VSAETrainer", "VSAETopKTrainer"} <= set(added)
    assert dl_saes.TRAINER_LOADERS["VSAETopKTrainer"] is load_dictionary_learning_registered_sae
    assert dl_saes.TRAINER_LOADERS["TopKTrainer"] is not load_dictionary_learning_registered_sae  # SAEBench's own
    assert "vsae-gelu-2l" in dl_saes.MODEL_CONFIGS

    monkeypatch.chdir(out)  # SAEBench reads ./downloaded_saes; offline, hf_hub_download finds the files there
    x = torch.randn(3, 7, D)
    for location in ("run/trainer_0", "run/trainer_1"):
        sae = dl_saes.load_dictionary_learning_sae(
            repo_id="someone/vsae-saes", location=location, model_name="tiny-lm", device="cpu", dtype=torch.float32,
        )
        assert sae.check_decoder_norms()
        ref = load_sae(run / Path(location).name)
        with torch.no_grad():
            torch.testing.assert_close(sae.encode(x), ref.encode(x))
            torch.testing.assert_close(sae.W_dec, ref.W_dec)
    assert type(sae).__name__ == "TopKSAE"  # trainer_1 went through SAEBench's own loader
    # Our loader also takes a local folder as repo id.
    local = load_dictionary_learning_registered_sae(str(run), "trainer_0/ae.pt", "tiny-lm", "cpu", torch.float32)
    assert local.cfg.architecture == "vsae_topk" and local.check_decoder_norms()


def test_signed_value_selection_has_no_saelens_form_and_nothing_is_written(tmp_path):
    run = make_run(tmp_path, [("top_k", {}), ("vsae_topk", {"mean_activation": "identity", "select_by": "value"})])
    out = tmp_path / "export"
    with pytest.raises(ExportError, match="no SAELens equivalent"):
        export_run(run, out)
    assert files_under(out) == []
    manifest = export_run(run, out, allow_missing_saelens=True)
    skipped = manifest["saes"][1]
    assert skipped["saelens_path"] is None and "no SAELens equivalent" in skipped["saelens_skipped"]
    assert (out / "downloaded_saes" / "run" / "trainer_1" / "ae.pt").is_file()
    assert not (out / "saelens" / "run" / "trainer_1").exists()


def test_bad_input_raises_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "export"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_run(tmp_path / "missing", out)
    (tmp_path / "empty" / "logs").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no trainer folders"):
        export_run(tmp_path / "empty", out)
    # config.json says a different dict_size than the weights in ae.pt
    run = make_run(tmp_path, [("top_k", {}), ("vsae_topk", {})])
    cfg_path = run / "trainer_1" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["trainer"]["dict_size"] = 2 * F
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="trainer_1"):
        export_run(run, out)
    # unknown trainer class
    cfg["trainer"].update(dict_size=F, trainer_class="NoSuchTrainer")
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="NoSuchTrainer"):
        export_run(run, out)
    assert files_under(out) == []
    assert export_main([str(run), "--out", str(out)]) == 2
    assert "nothing written" in capsys.readouterr().err
    assert files_under(out) == []


def test_failure_while_writing_rolls_back(tmp_path, monkeypatch):
    run = make_run(tmp_path, [("top_k", {}), ("vsae_topk", {})])
    out = tmp_path / "export"
    real, calls = atomic.write_bytes, []

    def flaky(path, data):
        calls.append(path)
        if len(calls) == 5:
            raise OSError("disk full")
        return real(path, data)

    monkeypatch.setattr(atomic, "write_bytes", flaky)
    with pytest.raises(OSError, match="disk full"):
        export_run(run, out)
    assert len(calls) == 5
    assert files_under(out) == []
    monkeypatch.setattr(atomic, "write_bytes", real)
    assert export_main([str(run), "--out", str(out)]) == 0
    assert len(files_under(out)) == 2 * (3 + 2) + 1
