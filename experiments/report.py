"""Write the HTML report of a study's run folder: RUN_DIR/report/index.html (figures beside it).

    python -m experiments.report RUN_DIR
    python -m experiments.report RUN_DIR --markdown   # print the headline table and verdicts as markdown

Reads RUN_DIR/results.json (written by python -m experiments.sweep) and the per-SAE analysis figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from experiments.cli import run_main


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="a study's run folder (holding results.json)")
    p.add_argument("--markdown", action="store_true",
                   help="print the headline table and the verdicts against the baseline as GitHub markdown instead")
    args = p.parse_args(argv)

    def body() -> int:
        from experiments.studies.report import headline_markdown, write_report
        from experiments.studies.results import StudyResults

        if args.markdown:
            print(headline_markdown(StudyResults.load(args.run_dir)))
        else:
            print(write_report(args.run_dir).resolve())
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
