"""Issue 17, "first contact with the real world": what broke when the project met real SAEs, real runner
scripts and real habits (one section per point of the issue)."""

import enum
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dictionary_learning_ext as dle
from dictionary_learning_ext.errors import EvalError, ExportError, StandinError
from saebench_adapters import evals, standin_data
from saebench_adapters.export import export_run
from saebench_adapters.saelens import build_saelens, to_saelens
from saebench_adapters.wrappers import load_sae, probe_inputs, wrap_dictionary
from test_saebench_export import save_trainer
from test_saebench_wrappers import D, make_trainer, perturb

REPO = Path(__file__).resolve().parents[1]


def topk_config(d: int, f: int, k: int) -> dict:
    return {"trainer_class": "TopKTrainer", "dict_class": "AutoEncoderTopK", "k": k, "layer": 0, "lm_name": "gelu-1l",
            "activation_dim": d, "dict_size": f}


# --- 1. SAELens export of TopK-type SAEs with float near-ties ------------------------------------------
def tied_topk(d: int, f: int, k: int, rel_diff: float, seed: int = 0):
    """An AutoEncoderTopK whose k-th place is always contested by two latents with (nearly) the same encoder
    row and the same bias (21.66275, as the pair 21.662752 / 21.662750 of the refused trained SAE): k-1
    latents always win, the pair decides the last place. ``rel_diff`` 0: an exact tie."""
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    torch.manual_seed(seed)
    ae = AutoEncoderTopK(d, f, k)
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        W, b = ae.encoder.weight, ae.encoder.bias
        b.zero_()
        b[: k - 1] = 1000.0
        W[k] = W[k - 1] * (1 + rel_diff * torch.randn(d, generator=gen))
        b[k - 1] = b[k] = 21.66275
    return ae


@pytest.mark.parametrize("rel_diff,seed", [(0.0, 0), (1e-7, 0), (1e-7, 1), (1e-6, 0)])
def test_saelens_export_of_topk_with_exact_and_near_ties(rel_diff, seed):
    torch.set_num_threads(1)
    d, f, k = 512, 512, 4
    cfg = topk_config(d, f, k)
    sae = wrap_dictionary(tied_topk(d, f, k, rel_diff, seed), cfg)
    copy = to_saelens(sae, cfg)  # before: "no SAELens equivalent" whenever the two sides broke a tie differently
    assert copy.architecture == "topk" and copy.cfg["k"] == k
    model = build_saelens(copy.cfg, copy.state_dict)
    x = probe_inputs(sae, n=256)
    with torch.no_grad():
        ours, theirs = sae.encode(x), model.encode(x)
        # Equal supports except a swap inside the tied pair; equal values on the common support.
        same_support = (ours != 0) == (theirs != 0)
        pair = torch.zeros(f, dtype=torch.bool)
        pair[[k - 1, k]] = True
        assert same_support[:, ~pair].all()
        both = (ours != 0) & (theirs != 0)
        torch.testing.assert_close(ours[both], theirs[both], rtol=1e-5, atol=1e-4)
        assert ((ours[:, pair] != 0).sum(-1) == (theirs[:, pair] != 0).sum(-1)).all()


def test_randomly_initialised_autoencoder_topk_at_the_papers_scale_all_export():
    """d 512, dict 2048, k 64..512, four seeds each: before, 3 of these 16 were refused."""
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    torch.set_num_threads(1)
    refused = []
    for k, seed in itertools.product((64, 128, 256, 512), range(4)):
        torch.manual_seed(seed)
        cfg = topk_config(512, 2048, k)
        try:
            assert to_saelens(wrap_dictionary(AutoEncoderTopK(512, 2048, k), cfg), cfg).architecture == "topk"
        except ExportError as err:
            refused.append((k, seed, str(err)[:200]))
    assert refused == []


def test_tie_tolerance_still_tells_wrong_architectures_apart():
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    from saebench_adapters.saelens import SaeLensRule, _parameter_probes, _saelens_cfg, check_rule

    torch.set_num_threads(1)
    torch.manual_seed(2)
    k = 64
    cfg = topk_config(512, 2048, k)
    sae = wrap_dictionary(AutoEncoderTopK(512, 2048, k), cfg)
    x = probe_inputs(sae, n=384).float()
    probes = _parameter_probes(sae, x)

    def check(rule):
        return check_rule(sae, rule, _saelens_cfg(sae, rule, cfg, {}), x, probes)

    assert check(SaeLensRule("topk", {"k": k}, boundary="topk", k=k)).ok
    for wrong in (SaeLensRule("topk", {"k": k + 1}, boundary="topk", k=k + 1),
                  SaeLensRule("topk", {"k": k - 1}, boundary="topk", k=k - 1),
                  SaeLensRule("abstopk", {"k": k}, boundary="abstopk", k=k),
                  SaeLensRule("standard", boundary="relu")):
        result = check(wrong)
        assert not result.ok, wrong
        assert "near tie" in result.why or "different number of latents" in result.why


def test_the_declared_rule_decides_and_a_rule_without_saelens_form_is_refused_at_once():
    from saebench_adapters.saelens import NoSaeLensForm, declared_rule

    top_k = make_trainer("top_k")
    assert declared_rule(wrap_dictionary(top_k.ae, top_k.config), top_k.config).architecture == "topk"
    signed = make_trainer("vsae_topk", mean_activation="identity", select_by="magnitude")
    assert declared_rule(wrap_dictionary(signed.ae, signed.config), signed.config).architecture == "abstopk"
    by_value = make_trainer("vsae_topk", mean_activation="identity", select_by="value")
    sae = wrap_dictionary(by_value.ae, by_value.config)
    assert isinstance(declared_rule(sae, by_value.config), NoSaeLensForm)
    with pytest.raises(ExportError, match="no SAELens equivalent: signed codes"):
        to_saelens(sae, by_value.config)


# --- 2. stand-in datasets never shadow the hub ---------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    """The stand-in model, also registered by its name for the command line (unregistered afterwards)."""
    from saebench_adapters import models
    from saebench_adapters.standin_model import standin_model

    model = standin_model(d_model=D)
    spec = models.register_model(models.ModelSpec(name="standin-gelu-1l", load=lambda layer, device: model))
    yield model
    for key in spec.names:
        models._SPECS.pop(key, None)


def tiny_run(root: Path, archs=("top_k", "vsae_topk"), lm_name: str = "standin-gelu-1l") -> Path:
    run = root / "run"
    for i, arch in enumerate(archs):
        trainer = make_trainer(arch, lm_name=lm_name)
        perturb(trainer.ae, seed=i)
        save_trainer(run / f"trainer_{i}", trainer)
    return run


def test_standins_live_outside_the_evals_working_directory_and_reach_saebench_by_absolute_path(
        tiny_model, tmp_path, monkeypatch):
    """The stand-ins are never a folder named like a hub id in the working directory; SAEBench's own dataset
    code gets them through the stand-in loader."""
    import sae_bench.sae_bench_utils.dataset_utils as dataset_utils

    seen = {}

    def adapter(ctx, saes):
        # SAEBench's own loader, as SCR/TPP/sparse probing call it, inside the eval's working directory
        train, _ = dataset_utils.get_bias_in_bios_or_amazon_product_dataset("LabHC/bias_in_bios_class_set1", 8, 8, 0)
        seen.update(cwd=os.getcwd(), loader=dataset_utils.load_dataset, classes=sorted(train),
                    marker=saes[0][1].cfg.eval_datasets)
        with pytest.raises(StandinError, match="no stand-in"):  # never the hub in a stand-in run
            dataset_utils.load_dataset("codeparrot/github-code", streaming=True, split="train")
        return {name: {"reason": "test adapter"} for name, _ in saes}

    monkeypatch.setitem(evals.ADAPTERS, "scr", adapter)
    out = tmp_path / "out"
    summary = evals_run(tiny_model, tiny_run(tmp_path), ["scr"], out)
    work = out / "saebench_work"
    assert seen["cwd"] == str(work)
    assert getattr(seen["loader"], "standin_root") == (out / standin_data.STANDIN_DIR).resolve()
    assert seen["classes"]  # read from the stand-in bias_in_bios
    assert seen["marker"]["standins"] is True
    for name in standin_data.STANDIN_NAMES:
        assert (out / standin_data.STANDIN_DIR / name / "train.parquet").is_file()
        assert not (work / name.split("/")[0]).exists(), "a stand-in where datasets would take it for the hub id"
    assert summary["standins"] and summary["standin_dir"] == str((out / standin_data.STANDIN_DIR).resolve())
    assert dataset_utils.load_dataset.__module__ == "datasets.load"  # restored


def evals_run(model, run, eval_types, out, **kwargs):
    from saebench_adapters.run_evals import run_evals

    return run_evals(run, eval_types, model=model, profile="quick", out=out, device="cpu", **kwargs)


def test_hub_run_refuses_to_start_when_a_standin_could_shadow_a_dataset_it_needs(tiny_model, tmp_path, monkeypatch):
    ran = []
    monkeypatch.setitem(evals.ADAPTERS, "scr", lambda ctx, saes: ran.append("scr") or {})
    out = tmp_path / "out"
    # what an earlier offline run of the previous version left in the same output folder
    standin_data.generate(out / "saebench_work", train_size=8, test_size=8, core_tokens=1000)
    run = tiny_run(tmp_path)
    with pytest.raises(StandinError) as err:
        evals_run(tiny_model, run, ["scr"], out, standins=False)
    message = str(err.value)
    assert str(out / "saebench_work" / "LabHC" / "bias_in_bios") in message
    assert "Delete" in message and "--out" in message
    assert ran == [] and not (out / "eval_results").exists()
    # core needs only openwebtext: refused for that folder too; an eval needing none of them is not.
    with pytest.raises(StandinError, match="Skylion007/openwebtext"):
        evals_run(tiny_model, run, ["core"], out, standins=False)
    monkeypatch.setitem(evals.ADAPTERS, "absorption", lambda ctx, saes: {n: {"reason": "x"} for n, _ in saes})
    assert evals_run(tiny_model, run, ["absorption"], out, standins=False)["standins"] is False


def test_no_standins_command_line_refuses_a_shadowed_output_folder(tiny_model, tmp_path, monkeypatch, capsys):
    from saebench_adapters.run_evals import main

    monkeypatch.setitem(evals.ADAPTERS, "scr", lambda ctx, saes: {})
    out = tmp_path / "out"
    (out / "saebench_work" / "canrager" / "amazon_reviews_mcauley_1and5").mkdir(parents=True)
    code = main(["--sae-dir", str(tiny_run(tmp_path)), "--model", "standin-gelu-1l", "--evals", "scr",
                 "--no-standins", "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "amazon_reviews_mcauley_1and5" in err and len(err.strip().splitlines()) == 1


# --- 3. SAEBench's runner scripts accept gelu-1l ---------------------------------------------------------
def test_saebench_runner_scripts_accept_gelu_1l_after_registration(monkeypatch):
    import sae_bench.custom_saes.run_all_evals_custom_saes as custom_saes
    import sae_bench.custom_saes.run_all_evals_dictionary_learning_saes as dl_saes

    from saebench_adapters.loaders import register_with_saebench

    monkeypatch.setattr(dl_saes, "MODEL_CONFIGS", dict(dl_saes.MODEL_CONFIGS))  # SAEBench's own table only
    monkeypatch.setattr(custom_saes, "MODEL_CONFIGS", dict(custom_saes.MODEL_CONFIGS))

    def lookups():
        # The scripts' own model checks (no SAE, no eval: nothing else runs).
        dl_saes.run_evals(repo_id="someone/saes", model_name="gelu-1l", sae_locations=[], llm_batch_size=1,
                          llm_dtype="float32", device="cpu", eval_types=[], random_seed=0)
        custom_saes.run_evals("gelu-1l", [], 1, "float32", "cpu", eval_types=[])

    for table in (dl_saes.MODEL_CONFIGS, custom_saes.MODEL_CONFIGS):
        table.pop("gelu-1l", None)
    with pytest.raises(ValueError, match="Unsupported model: gelu-1l"):
        lookups()
    register_with_saebench()
    lookups()
    for table in (dl_saes.MODEL_CONFIGS, custom_saes.MODEL_CONFIGS):
        assert table["gelu-1l"] == {"batch_size": 512, "dtype": "float32", "layers": [0], "d_model": 512}
        assert table["EleutherAI/pythia-70m-deduped"]["d_model"] == 512
        assert table["pythia-70m-deduped"] == {"batch_size": 512, "dtype": "float32", "layers": [3, 4], "d_model": 512}
        assert table["vsae-gelu-2l"]["d_model"] == 256  # the registered (embedded) model


def test_every_model_the_studies_name_is_known_to_saebench_s_runner_scripts():
    import sae_bench.custom_saes.run_all_evals_dictionary_learning_saes as dl_saes

    from experiments.studies.definitions import STUDIES
    from saebench_adapters.loaders import register_with_saebench
    from saebench_adapters.models import find_model

    register_with_saebench()
    for study in STUDIES.values():
        if study.run.architectures:
            spec = find_model(study.run.model)
            name = spec.name if spec is not None else study.run.model
            assert name in dl_saes.MODEL_CONFIGS, (study.name, name)
            assert study.run.layer in dl_saes.MODEL_CONFIGS[name]["layers"]


# --- 4. one failing eval stops nothing; the summary records it ------------------------------------------
def test_a_failing_eval_is_recorded_and_every_other_eval_runs(tiny_model, tmp_path, monkeypatch):
    from experiments.studies.results import EvalOutcome

    ran = []

    def broken(ctx, saes):
        ran.append("core")
        raise RuntimeError("reconstruction blew up\n  at a second line")

    def fine(ctx, saes):
        ran.append("absorption")
        return {name: {"reason": "test: no first-letter probe"} for name, _ in saes}

    monkeypatch.setitem(evals.ADAPTERS, "core", broken)
    monkeypatch.setitem(evals.ADAPTERS, "absorption", fine)
    out = tmp_path / "out"
    run = tiny_run(tmp_path)
    with pytest.raises(EvalError, match="1 of 2 evals failed: core: core failed: RuntimeError: reconstruction blew "
                                        "up at a second line") as err:
        evals_run(tiny_model, run, ["core", "absorption"], out)
    assert ran == ["core", "absorption"]
    assert err.value.exit_code == 1
    summary = json.loads((out / "eval_results" / "summary.json").read_text())
    assert summary == err.value.summary
    assert summary["status"] == "failed" and set(summary["failures"]) == {"core"}
    assert "\n" not in summary["failures"]["core"]
    for name, per_eval in summary["saes"].items():
        assert per_eval["core"]["status"] == "failed" and "reconstruction blew up" in per_eval["core"]["reason"]
        assert per_eval["absorption"]["status"] == "not_evaluable"
        # the study sweep's schema reads failed outcomes
        outcome = EvalOutcome.from_dict(per_eval["core"])
        assert outcome.status == "failed" and "blew up" in outcome.reason and outcome.metrics == {}


def test_command_line_exit_code_names_the_failed_eval(tiny_model, tmp_path, monkeypatch, capsys):
    from saebench_adapters.run_evals import main

    monkeypatch.setitem(evals.ADAPTERS, "tpp", lambda ctx, saes: 1 / 0)
    monkeypatch.setitem(evals.ADAPTERS, "absorption", lambda ctx, saes: {n: {"reason": "x"} for n, _ in saes})
    code = main(["--sae-dir", str(tiny_run(tmp_path)), "--model", "standin-gelu-1l", "--evals", "tpp", "absorption",
                 "--out", str(tmp_path / "out"), "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 1
    assert "error: 1 of 2 evals failed: tpp: tpp failed: ZeroDivisionError" in captured.err
    assert "absorption: not_evaluable" in captured.out and "tpp: failed" in captured.out


# --- 6. stand-in results say so in the result files themselves -----------------------------------------
def test_dataset_record_marks_standins_and_lists_the_dropped_datasets(tiny_model, tmp_path):
    from saebench_adapters.models import resolve_model
    from saebench_adapters.profiles import PROFILES

    target = resolve_model(tiny_model, 0, "cpu")
    ctx = evals.make_context(tmp_path, target, PROFILES["quick"], standins=True, device="cpu", llm_dtype="float32",
                             force_rerun=True)
    record = evals.dataset_record(ctx, "sparse_probing")
    assert record["standins"] is True and "NOT the hub datasets" in record["source"]
    assert set(record["datasets_dropped"]) == {"codeparrot/github-code", "Helsinki-NLP/europarl"}
    assert set(record["datasets"]) == {"LabHC/bias_in_bios", "canrager/amazon_reviews_mcauley_1and5",
                                       "fancyzhx/ag_news"}
    assert evals.dataset_record(ctx, "core")["stand_in_for"] == {
        "Skylion007/openwebtext": str(tmp_path / "standin_datasets" / "Skylion007/openwebtext")}
    ctx.standins = False
    assert evals.dataset_record(ctx, "sparse_probing") == {
        "standins": False, "source": "the hub datasets named in eval_config", "datasets_dropped": {},
        "datasets": ["LabHC/bias_in_bios", "canrager/amazon_reviews_mcauley_1and5", "codeparrot/github-code",
                     "fancyzhx/ag_news", "Helsinki-NLP/europarl"]}


def test_core_result_file_itself_records_standins_and_passes_saebench_s_validator(tiny_model, tmp_path):
    """A real SAEBench eval (core, seconds on the stand-in model): its result file, copied anywhere, says it
    was computed on stand-ins."""
    from sae_bench.evals.core.eval_output import CoreEvalOutput
    from sae_bench.sae_bench_utils.testing_utils import validate_eval_output_format_file

    out = tmp_path / "out"
    summary = evals_run(tiny_model, tiny_run(tmp_path, archs=("vsae_topk",)), ["core"], out)
    (name,) = summary["saes"]
    outcome = summary["saes"][name]["core"]
    assert outcome["status"] == "ok"
    copied = tmp_path / "elsewhere.json"
    copied.write_text(Path(outcome["file"]).read_text())
    validate_eval_output_format_file(str(copied), CoreEvalOutput)
    result = json.loads(copied.read_text())
    recorded = result["sae_cfg_dict"]["eval_datasets"]
    assert recorded["standins"] is True and "STAND-INS" in recorded["source"]
    assert recorded["datasets"] == ["Skylion007/openwebtext"]
    assert "standin_datasets" in result["eval_config"]["dataset"]
    assert not (out / "saebench_work" / "Skylion007").exists()


def test_a_kept_result_computed_on_other_data_is_a_failure_not_a_result(tiny_model, tmp_path):
    out = tmp_path / "out"
    run = tiny_run(tmp_path, archs=("vsae_topk",))
    summary = evals_run(tiny_model, run, ["core"], out)
    (name,) = summary["saes"]
    path = Path(summary["saes"][name]["core"]["file"])
    result = json.loads(path.read_text())
    result["sae_cfg_dict"]["eval_datasets"]["standins"] = False  # as if a hub run had written it
    path.write_text(json.dumps(result))
    with pytest.raises(EvalError, match="computed on hub data but this run uses stand-ins"):
        evals_run(tiny_model, run, ["core"], out, force_rerun=False)


# --- 7. export: usable from anywhere, named per study, undercomplete refused, metadata from the run ------------
def study_layout(root: Path, study: str, seeds=(0,), archs=("top_k", "vsae_topk"), lm_name: str = "tiny-lm",
                 run_config: dict | None = None) -> Path:
    """What the sweep writes: RUN_DIR/study.json, RUN_DIR/saes/seed_<s>/{run.json, trainer_i/}."""
    run_dir = root / study
    run_dir.mkdir(parents=True)
    (run_dir / "study.json").write_text("{}")
    for seed in seeds:
        folder = run_dir / "saes" / f"seed_{seed}"
        for i, arch in enumerate(archs):
            trainer = make_trainer(arch, lm_name=lm_name)
            perturb(trainer.ae, seed=i)
            save_trainer(folder / f"trainer_{i}", trainer)
            cfg = json.loads((folder / f"trainer_{i}" / "config.json").read_text())
            cfg["buffer"]["ctx_len"] = 64
            (folder / f"trainer_{i}" / "config.json").write_text(json.dumps(cfg))
        (folder / "run.json").write_text(json.dumps({"config": run_config or {"ctx_len": 64, "text": "local"}}))
    return run_dir


def test_two_studies_export_under_their_own_names(tmp_path):
    from saebench_adapters.export import default_export_name

    a = study_layout(tmp_path / "runs", "offline")
    b = study_layout(tmp_path / "runs", "ablation")
    out = tmp_path / "export"
    assert default_export_name(a / "saes" / "seed_0") == "offline_seed_0"
    assert default_export_name(a / "saes") == "offline"
    assert default_export_name(a / "saes" / "seed_0" / "trainer_1") == "offline_seed_0_trainer_1"
    first = export_run(a / "saes" / "seed_0", out / "a")
    second = export_run(b / "saes" / "seed_0", out / "b")
    assert [e["location"] for e in first["saes"]] == ["offline_seed_0/trainer_0", "offline_seed_0/trainer_1"]
    assert [e["location"] for e in second["saes"]] == ["ablation_seed_0/trainer_0", "ablation_seed_0/trainer_1"]
    assert first["repo_id"] == "local/offline_seed_0"
    named = export_run(a / "saes" / "seed_0", out / "c", name="my_saes")
    assert named["saes"][0]["location"] == "my_saes/trainer_0"
    with pytest.raises(ExportError, match="one folder name"):
        export_run(a / "saes" / "seed_0", out / "d", name="a/b")


def test_the_usage_snippet_loads_the_saes_from_any_working_directory(tmp_path, monkeypatch, capsys):
    from saebench_adapters.export import main

    run_dir = study_layout(tmp_path / "runs", "offline")
    out = tmp_path / "export"
    assert main([str(run_dir / "saes" / "seed_0"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert manifest["usage"] in printed
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    namespace: dict = {}
    exec(compile(manifest["usage"], "usage", "exec"), namespace)
    x = torch.randn(5, D)
    for i, location in enumerate(["offline_seed_0/trainer_0", "offline_seed_0/trainer_1"]):
        ref = load_sae(run_dir / "saes" / "seed_0" / f"trainer_{i}")
        with torch.no_grad():
            torch.testing.assert_close(namespace["saes"][location].encode(x), ref.encode(x))
    assert namespace["saelens_sae"].cfg.metadata.context_size == 64
    assert not (elsewhere / "downloaded_saes").exists()


def test_an_undercomplete_dictionary_saebench_cannot_load_is_refused_with_the_reason(tmp_path):
    run = tmp_path / "run"
    small = make_trainer("top_k", dict_size=8)  # 8 latents < 16 dimensions
    save_trainer(run / "trainer_0", small)
    out = tmp_path / "export"
    with pytest.raises(ExportError, match=r"dict_size 8 < activation_dim 16 .*load_dictionary_learning_topk_sae"):
        export_run(run, out)
    assert not out.exists()
    # ours load through our own loader, which has no such limit
    ours = tmp_path / "ours"
    save_trainer(ours / "trainer_0", make_trainer("vsae_topk", dict_size=8))
    assert export_run(ours, tmp_path / "export2")["saes"][0]["saelens_architecture"] == "topk"


def test_saelens_metadata_comes_from_the_run(tmp_path):
    from sae_lens import SAE

    def metadata(export):
        return SAE.load_from_disk(tmp_path / export / export_run_manifest(tmp_path / export)).cfg.metadata

    def export_run_manifest(out):
        return json.loads((out / "export_manifest.json").read_text())["saes"][0]["saelens_path"]

    # the embedded model (registered): its tokenizer puts no BOS first; the local corpus
    a = study_layout(tmp_path / "runs", "offline", archs=("top_k",), lm_name="vsae-gelu-2l")
    export_run(a / "saes" / "seed_0", tmp_path / "ea")
    m = metadata("ea")
    assert (m.context_size, m.dataset_path, m.prepend_bos, m.training_text) == (64, "local", False, "local")
    # gelu-1l (loaded through TransformerLens, whose tokenizer puts BOS first) on its hub dataset
    b = study_layout(tmp_path / "runs", "paper", archs=("top_k",), lm_name="gelu-1l",
                     run_config={"ctx_len": 128, "text": "hf:NeelNanda/c4-code-tokenized-2b:tokens"})
    export_run(b / "saes" / "seed_0", tmp_path / "eb")
    m = metadata("eb")
    assert (m.context_size, m.dataset_path, m.prepend_bos) == (64, "NeelNanda/c4-code-tokenized-2b", True)
    # an unknown model: prepend_bos unknown (null, with a warning), unless given
    c = study_layout(tmp_path / "runs", "other", archs=("top_k",), lm_name="tiny-lm")
    manifest = export_run(c / "saes" / "seed_0", tmp_path / "ec")
    assert metadata("ec").prepend_bos is None and "--prepend-bos" in manifest["saes"][0]["warnings"][0]
    export_run(c / "saes" / "seed_0", tmp_path / "ed", prepend_bos=True)
    assert metadata("ed").prepend_bos is True


def test_the_default_model_s_tokenizer_really_adds_no_bos_as_the_buffer_calls_it():
    """What the export writes for the embedded model is what its training buffer really sees."""
    from experiments.lm.models import load_model
    from saebench_adapters.models import find_model

    lm = load_model("default")
    ids = lm.model.tokenizer(["hello world"], return_tensors="pt", padding=True, truncation=True, max_length=8)
    assert int(ids["input_ids"][0, 0]) != lm.model.tokenizer.bos_token_id
    assert find_model("vsae-gelu-2l").prepend_bos is False


# --- 8. dictionary_learning's own scripts --------------------------------------------------------------
def test_dictionary_learning_load_dictionary_loads_every_registered_architecture(tmp_path):
    import dictionary_learning.utils as dl_utils

    assert getattr(dl_utils.load_dictionary, "extends_dictionary_learning", False)
    for i, name in enumerate(sorted(dle.ARCHITECTURES)):
        trainer = make_trainer(name)
        folder = tmp_path / f"trainer_{i}"
        save_trainer(folder, trainer)
        dictionary, config = dl_utils.load_dictionary(str(folder), "cpu")
        assert type(dictionary) is dle.ARCHITECTURES[name].dict_class, name
        assert config["trainer"]["trainer_class"] == trainer.config["trainer_class"]
        x = torch.randn(3, D)
        with torch.no_grad():  # (dictionary_learning's AutoEncoder loader folds decoder norms: compare reconstructions)
            torch.testing.assert_close(dictionary.decode(dictionary.encode(x)), trainer.ae.decode(trainer.ae.encode(x)),
                                       rtol=1e-5, atol=1e-5)
    # its own classes still go through its own loader; its own errors unchanged
    cfg = json.loads((tmp_path / "trainer_0" / "config.json").read_text())
    cfg["trainer"].update(dict_class="NoSuchDictionary", trainer_class="NoSuchTrainer")
    (tmp_path / "trainer_0" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="NoSuchTrainer"):
        dl_utils.load_dictionary(str(tmp_path / "trainer_0"), "cpu")


def test_demo_dry_run_takes_demo_py_s_flags_and_our_names(tmp_path, monkeypatch, capsys):
    from experiments import demo

    monkeypatch.chdir(tmp_path)
    assert demo.main(["--save_dir", "./run2", "--model_name", "default", "--layers", "0", "--architectures",
                      "top_k", "vsae_topk", "vsae_topk:paper", "standard", "--dry_run", "--use_wandb",
                      "--save_checkpoints", "--width", "2**10", "--k", "16", "32", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "._run2_default_top_k_vsae_topk_vsae_topk:paper_standard/resid_post_layer_0" in out
    assert "trainer_0: top_k k=16" in out and "trainer_3: vsae_topk k=32" in out and "trainer_6: standard" in out
    assert "dict size 1024" in out
    assert "wandb" in out and "checkpoints every 200 steps" in out
    assert list(tmp_path.iterdir()) == []  # nothing written
    with pytest.raises(SystemExit):
        demo.main(["--save_dir", "x", "--model_name", "default", "--layers", "0", "--architectures", "vsae_topks"])
    assert "invalid choice: 'vsae_topks'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.main(["--save_dir", "x", "--model_name", "default", "--layers", "0", "--architectures", "gated"])
    assert "not registered in dictionary_learning_ext" in capsys.readouterr().err
    assert demo.width("2^14") == demo.width("2**14") == demo.width("16384") == 16384


def test_demo_command_trains_one_run_per_layer_and_dictionary_learning_loads_it(tmp_path, monkeypatch, capsys):
    import dictionary_learning.utils as dl_utils

    from experiments import demo

    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    argv = ["--save_dir", "sweep", "--model_name", "default", "--layers", "0", "--architectures", "top_k", "vsae_topk",
            "--width", "512", "--k", "8", "--steps", "20", "--device", "cpu"]
    assert demo.main(argv) == 0, capsys.readouterr().err
    run = tmp_path / "sweep_default_top_k_vsae_topk" / "resid_post_layer_0"
    for i, dict_class in enumerate(["AutoEncoderTopK", "VSAETopK"]):
        dictionary, config = dl_utils.load_dictionary(str(run / f"trainer_{i}"), "cpu")  # as demo.py's eval_saes
        assert type(dictionary).__name__ == dict_class and dictionary.dict_size == 512
        assert json.loads((run / f"trainer_{i}" / "metrics.json").read_text())["trainer"] == f"trainer_{i}"
    recorded = json.loads((run / "run.json").read_text())["config"]
    assert recorded["normalize_activations"] is True and recorded["layer"] == 0


# The README's two-line change to a researcher's own copy of dictionary_learning_demo's demo_config.py, applied
# to a minimal demo_config-style module written here.
class TrainerType(enum.Enum):
    TOP_K = "top_k"
    VSAE_TOP_K = "vsae_topk"  # line 1 of the change


def get_trainer_configs(architectures, learning_rates, seeds, activation_dim, dict_sizes, model_name, device, layer,
                        submodule_name, steps, ks=(20, 40)):
    from dictionary_learning.trainers.top_k import AutoEncoderTopK, TopKTrainer

    from dictionary_learning_ext import ARCHITECTURES

    configs = []
    for seed, dict_size, lr, k in itertools.product(seeds, dict_sizes, learning_rates, ks):
        base = dict(activation_dim=activation_dim, dict_size=dict_size, lr=lr, k=k, seed=seed, device=device,
                    layer=layer, lm_name=model_name, submodule_name=submodule_name, steps=steps)
        if TrainerType.TOP_K.value in architectures:  # demo_config's own block, unchanged
            configs.append({"trainer": TopKTrainer, "dict_class": AutoEncoderTopK, "warmup_steps": 0,
                            "decay_start": None, "threshold_beta": 0.999, "threshold_start_step": 2,
                            "auxk_alpha": 1 / 32, "wandb_name": f"TopKTrainer-{model_name}-{submodule_name}", **base})
        for name in (t.value for t in TrainerType if t.value in architectures and t is not TrainerType.TOP_K):
            configs.append(ARCHITECTURES[name].trainer_config(**base))  # line 2 of the change
    return configs


def test_the_two_line_demo_config_change_trains_our_architectures(tmp_path):
    from dictionary_learning.training import trainSAE
    from dictionary_learning.trainers.top_k import TopKTrainer

    from dictionary_learning_ext import VSAETopKTrainer

    torch.set_num_threads(1)
    configs = get_trainer_configs(["top_k", "vsae_topk"], [8e-4], [0], D, [64], "tiny-lm", "cpu", 0, "resid_post", 6)
    assert [c["trainer"] for c in configs] == [TopKTrainer, VSAETopKTrainer, TopKTrainer, VSAETopKTrainer]
    gen = torch.Generator().manual_seed(0)
    data = iter([torch.randn(32, D, generator=gen) for _ in range(6)])
    trainSAE(data, configs, steps=6, save_dir=str(tmp_path / "sweep"), device="cpu")
    import dictionary_learning.utils as dl_utils

    dictionary, _ = dl_utils.load_dictionary(str(tmp_path / "sweep" / "trainer_1"), "cpu")
    assert type(dictionary).__name__ == "VSAETopK"
    # what the README warns about: demo_config's TopK block with only the trainer swapped fails
    topk_block = {k: v for k, v in configs[0].items() if k not in ("trainer", "dict_class")}
    with pytest.raises((TypeError, ValueError), match="threshold_beta"):
        VSAETopKTrainer(**topk_block)


# --- 9. the README's own-script example ----------------------------------------------------------------
SNIPPET = REPO / "tests" / "readme_snippets" / "own_script.py"
README_HEADING = "## Using the architectures from your own dictionary_learning scripts"
README_MARKER = "<!-- snippet: tests/readme_snippets/own_script.py -->"


def test_own_script_example_runs_as_written(tmp_path):
    # Its speed (the README says how long it took here) is a measurement, not an assertion: a loaded CI
    # machine must not turn a working example red.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(SNIPPET)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "VSAETopK" in done.stdout and (tmp_path / "runs" / "own_script" / "trainer_0" / "ae.pt").is_file()


def readme_block(text: str) -> str:
    """The python code block under the own-scripts heading (after the snippet marker)."""
    section = text.split(README_HEADING, 1)[1]
    section = section.split("\n## ", 1)[0]
    after = section.split(README_MARKER, 1)[1]
    body = after.split("```python\n", 1)[1]
    return body.split("\n```", 1)[0] + "\n"


def test_readme_example_is_the_tested_file():
    readme = (REPO / "README.md").read_text()
    assert README_HEADING in readme and README_MARKER in readme
    assert readme_block(readme) == SNIPPET.read_text()
