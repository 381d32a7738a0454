"""``python -m imgcache`` runs the same command line as the ``imgcache`` script."""

import sys

from imgcache.cli import main

sys.exit(main())
