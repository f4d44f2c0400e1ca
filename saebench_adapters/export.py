"""Export a training run for SAEBench and SAELens.

    python -m saebench_adapters.export RUN_DIR --out OUT [--repo-id OWNER/NAME] [--allow-missing-saelens]

For every trainer folder ``RUN_DIR/.../trainer_i`` (``ae.pt`` + ``config.json``) this writes

* SAEBench's dictionary_learning layout, as ``hf_hub_download(repo_id, "<run>/trainer_i/ae.pt",
  local_dir="downloaded_saes")`` and ``load_dictionary_learning_sae`` read it::

      OUT/downloaded_saes/<run>/trainer_i/{ae.pt, config.json}                 (weights, read by the loaders)
      OUT/downloaded_saes/<owner>_<name>/<run>/trainer_i/config.json           (read by the dispatcher)

  ``OUT/downloaded_saes/<run>/`` is also exactly what to upload to a HF repo ``<owner>/<name>``.
* a SAELens copy ``OUT/saelens/<run>/trainer_i/{cfg.json, sae_weights.safetensors}``
  (``sae_lens.SAE.load_from_disk``). The SAELens architecture is the one whose encode reproduces the
  dictionary's (standard / topk / abstopk / matching_pursuit / jumprelu), checked numerically; a dictionary that none
  reproduces (e.g. VSAETopK with identity mean activation and value selection: signed codes ranked by
  value; MP-SAE with select="abs") raises ``ExportError`` instead of producing a wrong file.
* ``OUT/export_manifest.json``: repo id, locations, SAELens architectures.

Everything is checked before anything is written; each file is written atomically and a failure
while writing removes what this export had written.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from safetensors.torch import save as safetensors_save

from .atomic import Transaction
from .wrappers import DictionarySAE, load_sae, probe_inputs, trainer_dirs

SAELENS_ARCHITECTURES = ("standard", "topk", "abstopk", "matching_pursuit", "jumprelu")


class ExportError(ValueError):
    """A run that cannot be exported faithfully; nothing was written."""


@dataclass
class SaeLensCopy:
    cfg: dict
    state_dict: dict[str, torch.Tensor]

    @property
    def architecture(self) -> str:
        return self.cfg["architecture"]


# --- SAELens ---------------------------------------------------------------------------
def _saelens_candidates(sae: DictionarySAE, trainer_cfg: dict) -> Iterator[tuple[str, dict, dict]]:
    """(architecture, extra cfg, extra weights) that might express ``sae``; tried in order."""
    yield "standard", {}, {}
    k = getattr(sae.dictionary, "k", None)
    k = int(k) if isinstance(k, torch.Tensor) else trainer_cfg.get("k")
    if isinstance(k, int) and k > 0:
        yield "topk", {"k": k}, {}
        yield "abstopk", {"k": k}, {}
        # k fixed pursuit steps (residual_threshold 0 turns SAELens's early stop off); tied, so no W_enc.
        yield "matching_pursuit", {"residual_threshold": 0.0, "max_iterations": k, "stop_on_duplicate_support": False}, {}
    threshold = getattr(sae.dictionary, "threshold", None)
    if isinstance(threshold, torch.Tensor):
        # relu(pre) * (relu(pre) > t) == pre * (pre > max(t, 0)): SAELens's JumpReLU
        t = threshold.detach().float().clamp_min(0.0).expand(sae.cfg.d_sae).clone()
        yield "jumprelu", {}, {"threshold": t}


def _saelens_cfg(sae: DictionarySAE, architecture: str, extra: dict, trainer_cfg: dict) -> dict:
    return {
        "architecture": architecture,
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **extra,
        "metadata": {
            "model_name": trainer_cfg["lm_name"],
            "hook_name": sae.cfg.hook_name,
            "hook_head_index": None,
            "prepend_bos": True,
            "context_size": trainer_cfg.get("context_size"),
            "dataset_path": None,
            "model_from_pretrained_kwargs": {},
            "training_trainer_class": trainer_cfg["trainer_class"],
        },
    }


def _build_saelens(cfg: dict, weights: dict[str, torch.Tensor]):
    from sae_lens import SAE

    model = SAE.from_dict(dict(cfg))
    model.load_state_dict(_own_weights(model, weights))
    return model.eval()


def _own_weights(model, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors ``model`` stores (a tied SAELens SAE has no W_enc: it uses W_dec.T)."""
    own = model.state_dict()
    return {k: v.detach().float().cpu().contiguous() for k, v in weights.items() if k in own}


@torch.no_grad()
def _parameter_probes(sae: DictionarySAE, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Parameter sets on which the dictionary's encode and a SAELens encode must agree: the trained
    ones, the same with the encoder bias pushed far down (mostly negative pre-activations, which
    separates ReLU/TopK/signed variants) and up, and random ones."""
    gen = torch.Generator().manual_seed(1)
    base = {r: getattr(sae, r).detach().float().cpu() for r in ("W_enc", "b_enc", "W_dec", "b_dec")}
    pre = (x.float().cpu() - base["b_dec"]) @ base["W_enc"] + base["b_enc"]
    spread = float(pre.std().clamp_min(1e-3))
    d_in, d_sae = base["W_enc"].shape
    rand_W = torch.randn(d_in, d_sae, generator=gen) / d_in**0.5
    return [
        base,
        {**base, "b_enc": base["b_enc"] - 4 * spread},
        {**base, "b_enc": base["b_enc"] + 4 * spread},
        {**base, "W_enc": rand_W, "b_enc": torch.randn(d_sae, generator=gen) * spread},
        {**base, "W_enc": rand_W, "b_enc": torch.randn(d_sae, generator=gen) * spread - 3 * spread},
    ]


@torch.no_grad()
def to_saelens(sae: DictionarySAE, trainer_cfg: dict) -> SaeLensCopy:
    """The SAELens config + weights that reproduce ``sae`` exactly, or ExportError."""
    sae = sae.to(device="cpu", dtype=torch.float32)
    x = probe_inputs(sae, n=384).float()
    probes = _parameter_probes(sae, x)
    tried = []
    for architecture, extra_cfg, extra_weights in _saelens_candidates(sae, trainer_cfg):
        cfg = _saelens_cfg(sae, architecture, extra_cfg, trainer_cfg)
        ok = True
        for params in probes:
            ours = sae.call_dictionary("encode", x, params={r: v.to(sae.W_enc.dtype) for r, v in params.items()})
            theirs = _build_saelens(cfg, {**params, **extra_weights}).encode(x)
            if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5 * float(ours.abs().max().clamp_min(1))):
                ok = False
                break
        tried.append(architecture)
        if not ok:
            continue
        weights = {r: getattr(sae, r).detach().float().cpu().contiguous() for r in ("W_enc", "b_enc", "W_dec", "b_dec")}
        weights.update(extra_weights)
        check = _build_saelens(cfg, weights)
        weights = _own_weights(check, weights)
        recon_ours, recon_theirs = sae(x), check(x)
        if not torch.allclose(recon_ours, recon_theirs, rtol=1e-5, atol=1e-5 * float(recon_ours.abs().max().clamp_min(1))):
            continue
        # SAELens's own serialisation of the config (adds e.g. metadata.sae_lens_version, which its
        # loader uses to tell the 6.x format from older ones).
        return SaeLensCopy(check.cfg.to_dict(), weights)
    raise ExportError(
        f"{trainer_cfg['trainer_class']} ({type(sae.dictionary).__name__}) with this config has no SAELens "
        f"equivalent: none of the SAELens architectures {tried} reproduces its encode "
        "(e.g. signed codes selected by value, or an identity code activation). Not writing a SAELens copy "
        "that would compute something else; export with --allow-missing-saelens to skip it."
    )


def _safetensors_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
    return safetensors_save({k: v.contiguous() for k, v in state_dict.items()})


# --- export ----------------------------------------------------------------------------
def export_run(
    run_dir: str | Path,
    out: str | Path,
    repo_id: Optional[str] = None,
    allow_missing_saelens: bool = False,
) -> dict[str, Any]:
    """Export every trainer of ``run_dir`` into ``out`` (see module docstring). Returns the manifest."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    dirs = trainer_dirs(run_dir)
    run_name = run_dir.resolve().name
    repo_id = repo_id or f"local/{run_name}"
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ExportError(f"repo id {repo_id!r} must look like OWNER/NAME")
    out = Path(out)
    root = out / "downloaded_saes"
    tx = Transaction()
    entries = []
    for tdir in dirs:
        rel = tdir.resolve().relative_to(run_dir.resolve())
        location = (Path(run_name) / rel).as_posix()
        try:
            sae = load_sae(tdir)
        except Exception as e:  # noqa: BLE001 - re-raised with the folder named
            raise ExportError(f"{tdir}: cannot be loaded as a registered architecture: {type(e).__name__}: {e}") from e
        config_bytes = (tdir / "config.json").read_bytes()
        trainer_cfg = json.loads(config_bytes)["trainer"]
        tx.add(root / location / "ae.pt", (tdir / "ae.pt").read_bytes())
        tx.add(root / location / "config.json", config_bytes)
        tx.add(root / repo_id.replace("/", "_") / location / "config.json", config_bytes)
        entry: dict[str, Any] = {
            "location": location,
            "trainer_class": trainer_cfg["trainer_class"],
            "dict_class": trainer_cfg.get("dict_class"),
            "saebench_unique_id": f"{repo_id.split('/')[1]}_{location.replace('/', '_')}",
        }
        try:
            copy = to_saelens(sae, trainer_cfg)
        except ExportError as e:
            if not allow_missing_saelens:
                raise ExportError(f"{tdir}: {e}") from e
            entry.update(saelens_path=None, saelens_architecture=None, saelens_skipped=str(e))
        else:
            sl_dir = out / "saelens" / location
            tx.add(sl_dir / "sae_weights.safetensors", _safetensors_bytes(copy.state_dict))
            tx.add_json(sl_dir / "cfg.json", copy.cfg)
            entry.update(saelens_path=(Path("saelens") / location).as_posix(), saelens_architecture=copy.architecture)
        entries.append(entry)
    manifest = {
        "run_dir": str(run_dir.resolve()),
        "repo_id": repo_id,
        "downloaded_saes": "downloaded_saes",
        "saes": entries,
        "usage": (
            "with cwd=OUT (or local_dir/download_location pointing into it): "
            "sae_bench.custom_saes.run_all_evals_dictionary_learning_saes.load_dictionary_learning_sae("
            f"repo_id={repo_id!r}, location=<location>, model_name=<model>, device=..., dtype=...) after "
            "saebench_adapters.loaders.register_with_saebench()"
        ),
    }
    tx.add_json(out / "export_manifest.json", manifest)
    tx.commit()
    return manifest


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m saebench_adapters.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="training output folder (save_dir of trainSAE) or one trainer folder")
    parser.add_argument("--out", required=True, help="export folder")
    parser.add_argument("--repo-id", default=None, help="HF repo id the SAEBench layout is named for (default local/<run>)")
    parser.add_argument(
        "--allow-missing-saelens", action="store_true",
        help="skip (and record) SAEs SAELens cannot express instead of failing",
    )
    args = parser.parse_args(argv)
    try:
        manifest = export_run(args.run_dir, args.out, args.repo_id, args.allow_missing_saelens)
    except (ExportError, FileNotFoundError, ValueError) as e:
        print(f"export failed (nothing written): {e}", file=sys.stderr)
        return 2
    for e in manifest["saes"]:
        print(f"{e['location']}: {e['trainer_class']} -> saelens {e['saelens_architecture']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
