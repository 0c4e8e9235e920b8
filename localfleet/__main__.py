"""``python -m localfleet``: see :mod:`localfleet.cli`."""

import sys

from localfleet.cli import main

sys.exit(main())
