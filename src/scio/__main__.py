"""``python -m scio`` runs the command line (see :mod:`scio.cli`)."""

import sys

from scio.cli import main

sys.exit(main())
