"""`python -m topology.cli`: the same entry point as the `konbini` script."""

import sys

from topology.cli.main import main

sys.exit(main())
