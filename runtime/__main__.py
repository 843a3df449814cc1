"""``python -m runtime``: the facekit command line (see :mod:`runtime.cli`)."""
import sys

from .cli import main

sys.exit(main())
