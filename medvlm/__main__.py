"""``python -m medvlm``: the ``medvlm`` command."""
import sys

from medvlm.cli import main

if __name__ == "__main__":
    sys.exit(main())
