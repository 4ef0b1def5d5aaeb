"""``python -m tl_loop`` runs the command line (see ``tl_loop.cli``)."""

import sys

from tl_loop.cli import main

sys.exit(main())
