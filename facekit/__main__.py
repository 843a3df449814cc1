"""``python -m facekit``: the same as the ``facekit`` command."""
import sys

from .cli import main

sys.exit(main())
