"""Train the embedded offline default language model (entry point; the code is ``experiments.lm.default_lm``).

    python -m experiments.train_default_lm --out experiments/assets/default_lm
    python -m experiments.train_default_lm --check   # retrain in a temp dir, compare checksums
"""

import sys

from experiments.lm.default_lm import main

if __name__ == "__main__":
    sys.exit(main())
