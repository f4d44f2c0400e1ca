"""Export a training run for SAEBench and SAELens.

    python -m saebench_adapters.export RUN_DIR --out OUT [--name NAME] [--repo-id OWNER/NAME]
        [--allow-missing-saelens] [--prepend-bos true|false]

For every trainer folder ``RUN_DIR/.../trainer_i`` (``ae.pt`` + ``config.json``) this writes

* SAEBench's dictionary_learning layout, as ``hf_hub_download(repo_id, "<name>/trainer_i/ae.pt",
  local_dir="downloaded_saes")`` and ``load_dictionary_learning_sae`` read it::

      OUT/downloaded_saes/<name>/trainer_i/{ae.pt, config.json}                (weights, read by the loaders)
      OUT/downloaded_saes/<owner>_<repo>/<name>/trainer_i/config.json          (read by the dispatcher)

  ``OUT/downloaded_saes/<name>/`` is also exactly what to upload to a HF repo ``<owner>/<repo>``.
  ``<name>`` defaults to the run folder's name with its parents while those are generic (a study's
  ``RUN_DIR/saes/seed_0`` exports as ``<study run dir>_seed_0``), so two studies never collide.
* a SAELens copy ``OUT/saelens/<name>/trainer_i/{cfg.json, sae_weights.safetensors}``
  (``sae_lens.SAE.load_from_disk``). The SAELens architecture is the one the dictionary's class declares as
  its inference rule (else the one that reproduces it), checked numerically up to float near ties
  (``saebench_adapters.saelens``); a dictionary SAELens cannot express raises ``ExportError`` instead of
  producing a wrong file. Its metadata (context size, dataset, whether BOS was prepended) come from the run
  (an unknown one is null, with a warning in the manifest).
* ``OUT/export_manifest.json``: repo id, locations, SAELens architectures, and ``usage``: Python that loads
  the exported SAEs from any working directory.

SAEs SAEBench's own loaders refuse (an undercomplete dictionary, dict_size < activation_dim, of a trainer
class SAEBench loads itself) are refused here, with the reason. Everything is checked before anything is
written; each file is written atomically and a failure while writing removes what this export had written.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Optional

from dictionary_learning_ext.errors import ExportError, MissingFileError

# torch and SAELens take seconds to import: they are imported inside export_run and main, so that
# `--help` and argument errors answer at once.


GENERIC_FOLDER = re.compile(r"(saes|seed_\d+|trainer_\d+)")
"""Folder names every run shares (a study's ``saes/seed_<s>``, a trainer folder): not a name of its own."""
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def default_export_name(run_dir: str | Path) -> str:
    """The name a run is exported under: its folder's name, prefixed by its parents' while those names are
    generic (``saes``, ``seed_<s>``, ``trainer_<i>``; ``saes`` itself is left out), e.g. ``runs/offline/saes/
    seed_0`` -> ``offline_seed_0``, ``runs/offline/saes`` -> ``offline``, ``runs/gelu1l`` -> ``gelu1l``."""
    path = Path(run_dir).resolve()
    parts = [path.name]
    while GENERIC_FOLDER.fullmatch(parts[0]) and path.parent != path and path.parent.name:
        path = path.parent
        parts.insert(0, path.name)
    kept = [p for p in parts if p != "saes"] or parts
    return "_".join(kept)


def _checked_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise ExportError(f"export name {name!r} must be one folder name (letters, digits, '.', '_', '-'), "
                          "e.g. --name offline_seed_0")
    return name


def _run_record(trainer_dir: Path) -> dict[str, Any]:
    """The run's ``run.json`` (written next to the trainer folders by experiments' training), or {}."""
    from dictionary_learning_ext.io import read_json

    for folder in (trainer_dir.parent, trainer_dir):
        if (folder / "run.json").is_file():
            return read_json(folder / "run.json", "run record")
    return {}


def training_metadata(trainer_dir: Path, config: dict[str, Any], prepend_bos: Optional[bool] = None) -> dict[str, Any]:
    """SAELens metadata of one trainer from its run: ``context_size`` (the buffer's ctx_len), ``dataset_path``
    (the hub dataset of an ``hf:`` text source, else the recorded source, e.g. "local"), ``prepend_bos``
    (given, recorded, or whether the model's tokenizer puts BOS first as dictionary_learning's buffer calls
    it; None when nothing tells) and ``training_text`` (the run's text source as recorded, or None)."""
    from .models import prepends_bos

    trainer_cfg = config["trainer"]
    run = _run_record(trainer_dir)
    run_cfg = run.get("config") or {}
    buffer = config.get("buffer") or {}
    context_size = buffer.get("ctx_len", run_cfg.get("ctx_len"))
    text = run_cfg.get("text")
    dataset_path = None
    if isinstance(text, str):
        dataset_path = text[3:].split(":", 1)[0] if text.startswith("hf:") else text
    if prepend_bos is None:
        prepend_bos = next((r["prepend_bos"] for r in (run, run_cfg, buffer) if isinstance(r.get("prepend_bos"), bool)),
                           None)
    if prepend_bos is None:
        prepend_bos = prepends_bos(trainer_cfg["lm_name"])
    return {"context_size": int(context_size) if isinstance(context_size, int) else None,
            "dataset_path": dataset_path, "prepend_bos": prepend_bos, "training_text": text}


UNKNOWN_BOS = ("unknown whether the SAE saw a BOS token first: {lm!r} is neither registered nor a known hub model and "
               "its tokenizer is not in the local Hugging Face cache; cfg.json has prepend_bos null. Re-export with "
               "--prepend-bos true|false (whether the tokenizer, called with its defaults, starts every text with BOS)")


def _check_saebench_loads(trainer_dir: Path, trainer_cfg: dict[str, Any], sae) -> None:
    """Refuse what SAEBench's own loader for this trainer class would refuse (with an empty AssertionError)."""
    from .loaders import saebench_loads_natively

    loader = saebench_loads_natively(trainer_cfg["trainer_class"])
    if loader is not None and sae.cfg.d_sae < sae.cfg.d_in:
        raise ExportError(
            f"{trainer_dir}: dict_size {sae.cfg.d_sae} < activation_dim {sae.cfg.d_in} (an undercomplete dictionary). "
            f"SAEBench loads {trainer_cfg['trainer_class']} with its own {loader.__module__}.{loader.__name__}, which "
            "asserts dict_size >= activation_dim and fails without a message. Export only dictionaries at least as "
            f"wide as the activations (e.g. train with --dict-size {4 * sae.cfg.d_in})"
        )


def usage_snippet(out: Path, entries: list[dict[str, Any]]) -> str:
    """Python that loads the exported SAEs from any working directory (absolute paths; SAEBench's own
    dispatcher reads ./downloaded_saes relative to the working directory, whatever download_location says)."""
    root = (out / "downloaded_saes").resolve()
    first = entries[0]
    lines = [
        "import torch",
        "from saebench_adapters.loaders import load_dictionary_learning_registered_sae",
        "# SAEBench's BaseSAE of every exported SAE (any working directory):",
        "saes = {",
        *(f"    {e['location']!r}: load_dictionary_learning_registered_sae("
          f"{str(root)!r}, {e['location'] + '/ae.pt'!r}, model_name={e['lm_name']!r}, device='cpu', "
          "dtype=torch.float32)," for e in entries),
        "}",
    ]
    with_saelens = [e for e in entries if e.get("saelens_path")]
    if with_saelens:
        e = with_saelens[0]
        lines += ["from sae_lens import SAE",
                  f"saelens_sae = SAE.load_from_disk({str((out / e['saelens_path']).resolve())!r})"]
    lines += ["# SAEBench's own dispatcher (load_dictionary_learning_sae, run_all_evals_dictionary_learning_saes) "
              f"reads ./downloaded_saes: call it with {str(out.resolve())!r} as the working directory, after "
              f"saebench_adapters.loaders.register_with_saebench(); e.g. location={first['location']!r}"]
    return "\n".join(lines) + "\n"


def export_run(
    run_dir: str | Path,
    out: str | Path,
    repo_id: Optional[str] = None,
    allow_missing_saelens: bool = False,
    name: Optional[str] = None,
    prepend_bos: Optional[bool] = None,
) -> dict[str, Any]:
    """Export every trainer of ``run_dir`` into ``out`` (see module docstring). Returns the manifest.
    ``name``: the folder the run is exported under (default ``default_export_name(run_dir)``);
    ``prepend_bos``: overrides what the export works out about BOS for the SAELens metadata."""
    from dictionary_learning_ext.io import Transaction
    from dictionary_learning_ext.registry import read_trainer_config

    from .saelens import safetensors_bytes, to_saelens
    from .wrappers import load_sae, relative_trainer_dir, trainer_dirs

    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise MissingFileError(f"run folder {run_dir} does not exist")
    dirs = trainer_dirs(run_dir)
    name = _checked_name(name if name is not None else default_export_name(run_dir))
    repo_id = repo_id or f"local/{name}"
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ExportError(f"repo id {repo_id!r} must look like OWNER/NAME")
    out = Path(out)
    root = out / "downloaded_saes"
    tx = Transaction()
    entries = []
    for tdir in dirs:
        location = (Path(name) / relative_trainer_dir(run_dir, tdir)).as_posix()
        try:
            sae = load_sae(tdir)
        except Exception as e:  # noqa: BLE001 - re-raised with the folder named
            raise ExportError(f"{tdir}: cannot be loaded as a registered architecture: {type(e).__name__}: {e}") from e
        config = read_trainer_config(tdir)
        trainer_cfg = config["trainer"]
        _check_saebench_loads(tdir, trainer_cfg, sae)
        config_bytes = (tdir / "config.json").read_bytes()  # copied byte for byte
        tx.add(root / location / "ae.pt", (tdir / "ae.pt").read_bytes())
        tx.add(root / location / "config.json", config_bytes)
        tx.add(root / repo_id.replace("/", "_") / location / "config.json", config_bytes)
        entry: dict[str, Any] = {
            "location": location,
            "trainer_class": trainer_cfg["trainer_class"],
            "dict_class": trainer_cfg.get("dict_class"),
            "lm_name": trainer_cfg["lm_name"],
            "saebench_unique_id": f"{repo_id.split('/')[1]}_{location.replace('/', '_')}",
        }
        metadata = training_metadata(tdir, config, prepend_bos)
        if metadata["prepend_bos"] is None:
            entry["warnings"] = [UNKNOWN_BOS.format(lm=trainer_cfg["lm_name"])]
        try:
            copy = to_saelens(sae, trainer_cfg, metadata=metadata)
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
        "name": name,
        "repo_id": repo_id,
        "downloaded_saes": "downloaded_saes",
        "saes": entries,
        "usage": usage_snippet(out, entries),
    }
    tx.add_json(out / "export_manifest.json", manifest)
    tx.commit()
    return manifest


DESCRIPTION = """\
Export a training run for SAEBench and SAELens. For every trainer folder (ae.pt + config.json) it writes

  OUT/downloaded_saes/<name>/trainer_i/{ae.pt,config.json}   SAEBench's dictionary_learning layout
  OUT/downloaded_saes/<owner>_<repo>/<name>/trainer_i/config.json   (read by SAEBench's dispatcher)
  OUT/saelens/<name>/trainer_i/{cfg.json,sae_weights.safetensors}   for sae_lens.SAE.load_from_disk

and OUT/export_manifest.json (repo id, locations, SAELens architectures, and Python that loads the SAEs
from any working directory; printed at the end). <name> defaults to the run folder's name, prefixed by
its parents' while those are generic (runs/offline/saes/seed_0 -> offline_seed_0). Upload
OUT/downloaded_saes/<name>/ to the HF repo <owner>/<repo> to share it. Everything is checked before
anything is written; a failure leaves nothing behind.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m saebench_adapters.export", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", help="training output folder (save_dir of trainSAE) or one trainer folder")
    parser.add_argument("--out", required=True, help="export folder (created; files in it are replaced)")
    parser.add_argument("--name", default=None,
                        help="folder the run is exported under (default: the run folder's name, prefixed by its "
                             "parents' while those are generic, e.g. offline_seed_0 for runs/offline/saes/seed_0)")
    parser.add_argument("--repo-id", default=None,
                        help="HF repo id OWNER/NAME the SAEBench layout is named for (default: local/<name>)")
    parser.add_argument("--prepend-bos", choices=("true", "false"), default=None,
                        help="whether the SAEs were trained with a BOS token first (default: worked out from the "
                             "run's model; needed only when that is unknown)")
    parser.add_argument(
        "--allow-missing-saelens", action="store_true",
        help="skip (and record in the manifest) SAEs SAELens cannot express instead of failing",
    )
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from dictionary_learning_ext.errors import VsaeError, format_error

    try:
        manifest = export_run(args.run_dir, args.out, args.repo_id, args.allow_missing_saelens, name=args.name,
                              prepend_bos=None if args.prepend_bos is None else args.prepend_bos == "true")
    except VsaeError as err:
        err.add_note("export failed: nothing written")
        print(format_error(err), file=sys.stderr)
        return err.exit_code
    for e in manifest["saes"]:
        print(f"{e['location']}: {e['trainer_class']} -> saelens {e['saelens_architecture']}")
        for warning in e.get("warnings", []):
            print(f"  warning: {warning}", file=sys.stderr)
    print(f"wrote {args.out}; to load the SAEs from any working directory:\n")
    print(manifest["usage"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
