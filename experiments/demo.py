"""dictionary_learning_demo's ``demo.py`` command line, on this project's training.

    python -m experiments.demo --save_dir ./run --model_name EleutherAI/pythia-70m-deduped --layers 3 \\
        --architectures top_k vsae_topk [--use_wandb] [--dry_run] [--save_checkpoints] [--device cuda:0] \\
        [--hf_repo_id OWNER/NAME] [--width 2**14] [--k 64 128] [--steps 20000] [--text hf:<dataset>]

Researchers train dictionary_learning SAEs with dictionary_learning_demo's ``demo.py`` (github.com/
adamkarvonen/dictionary_learning_demo), whose ``--architectures`` choices are hard-coded. This command takes
the same flags and names -- demo.py's architecture names plus every architecture registered in
``dictionary_learning_ext`` (vsae, vsae_topk, mp_sae, with ``name:variant`` too, e.g. vsae_topk:paper) --
and trains with this project's run (``experiments.training.run.train_run``, dictionary_learning's
ActivationBuffer and trainers): one run per layer (per layer and width when several widths are given),
into demo.py's folders ``<save_dir>_<model>_<architectures>/resid_post_layer_<layer>`` (with its "/" -> "_"),
each evaluated at the end (metrics.json per trainer) like demo.py's ``eval_saes``.

As demo.py: activations normalised to unit mean squared norm (folded back into the saved weights),
bfloat16 autocast on CUDA, ``--dry_run`` builds everything and trains nothing (here: prints what would train
and exits without loading the model), ``--hf_repo_id`` uploads the run folders to an existing HF model repo.
Different: demo.py's width, k, token-count and learning-rate grids live in its ``demo_config.py``; here
``--width`` (ints or powers: 16384, 2**14, 2^14), ``--k`` and ``--steps`` set them (default: this project's
run defaults, dict size 4 x d_model), every architecture keeps its own default learning rate, the text
defaults to the offline local corpus (``--text hf:EleutherAI/fineweb-edu-dedup-10b`` for demo.py's), and
``--save_checkpoints`` writes resumable checkpoints every tenth of the run (``python -m experiments.train
--resume DIR`` continues one) instead of demo.py's log-spaced snapshots.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from experiments.cli import run_main

DEMO_ARCHITECTURES = ("standard", "standard_new", "top_k", "batch_top_k", "gated", "p_anneal", "jump_relu",
                      "matryoshka_batch_top_k")
"""demo.py's names (its ``demo_config.TrainerType`` values)."""
_POWER = re.compile(r"\s*(\d+)\s*(?:\*\*|\^)\s*(\d+)\s*")


def architecture_names() -> list[str]:
    """demo.py's names, then the registered ones it does not have."""
    from dictionary_learning_ext import ARCHITECTURES

    return [*DEMO_ARCHITECTURES, *sorted(set(ARCHITECTURES) - set(DEMO_ARCHITECTURES))]


def architecture(value: str) -> str:
    """An ``--architectures`` value: a name of demo.py or of the registry, optionally ``name:variant``."""
    from dictionary_learning_ext.registry import parse_spec

    name = value.partition(":")[0]
    choices = architecture_names()
    if name not in choices:
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(choices)}; "
                                         "a registered one may carry a variant, e.g. vsae_topk:paper)")
    try:
        parse_spec(value)
    except Exception as err:  # noqa: BLE001 - an unregistered demo name or an unknown variant: say which
        if name in DEMO_ARCHITECTURES and ":" not in value:
            raise argparse.ArgumentTypeError(
                f"{value!r} is one of demo.py's architectures but is not registered in dictionary_learning_ext, so "
                "this command cannot train it; train it with dictionary_learning_demo itself") from None
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def width(value: str) -> int:
    """A dictionary width: an int (16384) or a power (2**14, 2^14)."""
    match = _POWER.fullmatch(value)
    try:
        n = int(match.group(1)) ** int(match.group(2)) if match else int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid width {value!r}: give an int (16384) or a power (2**14)") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"invalid width {value!r}: must be positive")
    return n


def default_device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.demo", description=__doc__.split("\n\n")[1],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # demo.py's flags
    parser.add_argument("--save_dir", type=str, required=True, help="where to store sweep")
    parser.add_argument("--use_wandb", action="store_true", help="use wandb logging")
    parser.add_argument("--dry_run", action="store_true", help="print what would train and exit")
    parser.add_argument("--save_checkpoints", action="store_true",
                        help="save (resumable) checkpoints, every tenth of the run")
    parser.add_argument("--layers", type=int, nargs="+", required=True, help="layers to train SAE on")
    parser.add_argument("--model_name", type=str, required=True,
                        help="which language model to use ('default' = the embedded offline model, 'gelu-1l', or a "
                             "Hugging Face id)")
    parser.add_argument("--architectures", type=architecture, nargs="+", required=True, metavar="ARCHITECTURE",
                        help=f"which SAE architectures to train: demo.py's ({', '.join(DEMO_ARCHITECTURES)}; those "
                             "registered here can be trained) or any registered one (vsae, vsae_topk, mp_sae, ...; "
                             "name:variant too)")
    parser.add_argument("--device", type=str, default=None, help="device to train on (default: cuda:0 if available, "
                                                                 "else cpu)")
    parser.add_argument("--hf_repo_id", type=str, help="Hugging Face repo ID to push results to")
    # this project's additions (demo.py keeps these in demo_config.py)
    parser.add_argument("--width", type=width, nargs="+", default=None, metavar="WIDTH",
                        help="dictionary widths, ints or powers (16384, 2**14, 2^14); one run each "
                             "(default: 4 x d_model)")
    parser.add_argument("--k", type=int, nargs="+", default=None, help="k of the architectures that have one "
                                                                      "(default: the run default)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the run default)")
    parser.add_argument("--text", type=str, default=None,
                        help="text source: 'local' (default, offline) or 'hf:<dataset>[:<column>]'")
    parser.add_argument("--overwrite", action="store_true", help="replace existing run folders")
    return parser


@dataclass(frozen=True)
class DemoRun:
    layer: int
    width: Optional[int]
    config: Any
    """The run's ``experiments.training.config.RunConfig``."""

    @property
    def save_dir(self) -> str:
        return self.config.save_dir


def sweep_dir(save_dir: str, model_name: str, architectures: Sequence[str]) -> str:
    """demo.py's sweep folder: ``f"{save_dir}_{model_name}_{'_'.join(architectures)}"`` with every "/" -> "_"."""
    return f"{save_dir}_{model_name}_{'_'.join(architectures)}".replace("/", "_")


def plan_runs(args: argparse.Namespace) -> list[DemoRun]:
    """One ``RunConfig`` per layer (and per width when several are given), validated, nothing loaded."""
    from experiments.training.config import RunConfig

    device = args.device or default_device()
    sweep = sweep_dir(args.save_dir, args.model_name, args.architectures)
    widths: list[Optional[int]] = list(args.width) if args.width else [None]
    runs = []
    for layer in args.layers:
        for w in widths:
            folder = Path(sweep) / f"resid_post_layer_{layer}"
            if len(widths) > 1:
                folder = folder / f"width_{w}"
            values = dict(
                architectures=tuple(args.architectures), save_dir=str(folder), model=args.model_name, layer=layer,
                device=device, normalize_activations=True,
                autocast_dtype="bfloat16" if device.startswith("cuda") else "float32",
                wandb=args.use_wandb,
            )
            if w is not None:
                values["dict_size"] = w
            if args.k:
                values["ks"] = tuple(args.k)
            if args.steps is not None:
                values["steps"] = args.steps
            if args.text is not None:
                values["text"] = args.text
            if args.save_checkpoints:
                values["checkpoint_every"] = max(1, values.get("steps", RunConfig.steps) // 10)
            runs.append(DemoRun(layer, w, RunConfig(**values)))
    return runs


def describe(run: DemoRun) -> str:
    from experiments.training.plan import plan_trainers

    c = run.config
    trainers = ", ".join(f"{t.trainer}: {t.label}" + (f" k={t.k}" if t.k is not None else "")
                         for t in plan_trainers(c))
    size = c.dict_size if c.dict_size is not None else "4 x d_model"
    return (f"layer {run.layer} -> {c.save_dir}\n"
            f"  model {c.model}, dict size {size}, {c.steps} steps x {c.batch_size} tokens, text {c.text}, "
            f"device {c.device}, normalize_activations {c.normalize_activations}, autocast {c.autocast_dtype}"
            + (f", checkpoints every {c.checkpoint_every} steps" if c.checkpoint_every else "")
            + (", wandb" if c.wandb else "") + f"\n  trainers: {trainers}")


def upload(folder: str, repo_id: str) -> None:
    """demo.py's push_to_huggingface: the run folder into the repo at the same relative path."""
    import huggingface_hub

    huggingface_hub.HfApi().upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model", path_in_repo=folder)


def check_repo(repo_id: str) -> None:
    from dictionary_learning_ext.errors import UsageError

    import huggingface_hub

    try:
        exists = huggingface_hub.repo_exists(repo_id=repo_id, repo_type="model")
    except Exception as err:  # noqa: BLE001 - offline, bad token, ...: say so before training
        raise UsageError(f"--hf_repo_id {repo_id}: cannot reach the Hugging Face hub ({type(err).__name__}: "
                         f"{' '.join(str(err).split())[:200]}); drop --hf_repo_id or run where the hub is "
                         "reachable") from err
    if not exists:
        raise UsageError(f"--hf_repo_id {repo_id}: no such model repo (create it first, as demo.py expects)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        runs = plan_runs(args)
        if args.dry_run:
            print(f"dry run: {len(runs)} run(s) would train (nothing loaded, nothing written)")
            for run in runs:
                print(describe(run))
            if args.hf_repo_id:
                folder = sweep_dir(args.save_dir, args.model_name, args.architectures)
                print(f"then upload {folder} to {args.hf_repo_id}")
            return 0
        if args.hf_repo_id:
            check_repo(args.hf_repo_id)
        from experiments.training.evaluate import metrics_table
        from experiments.training.run import train_run

        for run in runs:
            print(describe(run), flush=True)
            Path(run.save_dir).parent.mkdir(parents=True, exist_ok=True)
            rows = train_run(run.config, overwrite=args.overwrite,
                             argv=list(argv) if argv is not None else sys.argv[1:])
            print(metrics_table(rows))
            print(f"saved to {Path(run.save_dir).resolve()}\n", flush=True)
        if args.hf_repo_id:
            folder = sweep_dir(args.save_dir, args.model_name, args.architectures)
            upload(folder, args.hf_repo_id)
            print(f"uploaded {folder} to {args.hf_repo_id}")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
