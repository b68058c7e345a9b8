"""``python -m minilora.cli`` runs the command line, as the ``minilora`` script does."""

import sys

from . import main

sys.exit(main())
