"""``python -m fusecare``: the ``fusecare`` command, for an environment without its console script."""

import sys

from fusecare.cli import main

sys.exit(main())
