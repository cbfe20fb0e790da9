"""`python -m inspectd` runs the console script."""

import sys

from inspectd.cli import main

sys.exit(main())
