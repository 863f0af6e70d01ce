"""``python -m retina_fast ...`` is ``retina-fast ...``."""

import sys

from retina_fast.cli import main

sys.exit(main(allow_reexec=True))
