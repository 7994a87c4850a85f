"""``python -m train <stage>|all`` and ``accelerate launch -m train``: the same command as ``medvlm train``."""
import sys

from train.cli import main

if __name__ == "__main__":
    sys.exit(main())
