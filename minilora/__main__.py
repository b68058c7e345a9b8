"""``python -m minilora`` runs the command line, as the ``minilora`` script does."""

import sys

from .cli import main

sys.exit(main())
