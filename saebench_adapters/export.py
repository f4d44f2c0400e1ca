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
  dictionary's, checked numerically (``saebench_adapters.saelens``); a dictionary that none reproduces
  raises ``ExportError`` instead of producing a wrong file.
* ``OUT/export_manifest.json``: repo id, locations, SAELens architectures.

Everything is checked before anything is written; each file is written atomically and a failure
while writing removes what this export had written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from dictionary_learning_ext.errors import ExportError, MissingFileError

# torch and SAELens take seconds to import: they are imported inside export_run and main, so that
# `--help` and argument errors answer at once.


def export_run(
    run_dir: str | Path,
    out: str | Path,
    repo_id: Optional[str] = None,
    allow_missing_saelens: bool = False,
) -> dict[str, Any]:
    """Export every trainer of ``run_dir`` into ``out`` (see module docstring). Returns the manifest."""
    from dictionary_learning_ext.io import Transaction
    from dictionary_learning_ext.registry import read_trainer_config

    from .saelens import safetensors_bytes, to_saelens
    from .wrappers import load_sae, relative_trainer_dir, trainer_dirs

    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise MissingFileError(f"run folder {run_dir} does not exist")
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
        location = (Path(run_name) / relative_trainer_dir(run_dir, tdir)).as_posix()
        try:
            sae = load_sae(tdir)
        except Exception as e:  # noqa: BLE001 - re-raised with the folder named
            raise ExportError(f"{tdir}: cannot be loaded as a registered architecture: {type(e).__name__}: {e}") from e
        trainer_cfg = read_trainer_config(tdir)["trainer"]
        config_bytes = (tdir / "config.json").read_bytes()  # copied byte for byte
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
            tx.add(sl_dir / "sae_weights.safetensors", safetensors_bytes(copy.state_dict))
            tx.add_json(sl_dir / "cfg.json", copy.cfg)
            entry.update(saelens_path=f"saelens/{location}", saelens_architecture=copy.architecture)
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


DESCRIPTION = """\
Export a training run for SAEBench and SAELens. For every trainer folder (ae.pt + config.json) it writes

  OUT/downloaded_saes/<run>/trainer_i/{ae.pt,config.json}   SAEBench's dictionary_learning layout
  OUT/downloaded_saes/<owner>_<name>/<run>/trainer_i/config.json   (read by SAEBench's dispatcher)
  OUT/saelens/<run>/trainer_i/{cfg.json,sae_weights.safetensors}   for sae_lens.SAE.load_from_disk

and OUT/export_manifest.json (repo id, locations, SAELens architectures). Upload
OUT/downloaded_saes/<run>/ to the HF repo <owner>/<name> to share it. Everything is checked before
anything is written; a failure leaves nothing behind.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m saebench_adapters.export", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", help="training output folder (save_dir of trainSAE) or one trainer folder")
    parser.add_argument("--out", required=True, help="export folder (created; files in it are replaced)")
    parser.add_argument("--repo-id", default=None,
                        help="HF repo id OWNER/NAME the SAEBench layout is named for (default: local/<run>)")
    parser.add_argument(
        "--allow-missing-saelens", action="store_true",
        help="skip (and record in the manifest) SAEs SAELens cannot express instead of failing",
    )
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from dictionary_learning_ext.errors import VsaeError, format_error

    try:
        manifest = export_run(args.run_dir, args.out, args.repo_id, args.allow_missing_saelens)
    except VsaeError as err:
        err.add_note("export failed: nothing written")
        print(format_error(err), file=sys.stderr)
        return err.exit_code
    for e in manifest["saes"]:
        print(f"{e['location']}: {e['trainer_class']} -> saelens {e['saelens_architecture']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
