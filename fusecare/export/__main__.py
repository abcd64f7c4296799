"""``python -m fusecare.export``: the same command as ``fusecare export``."""

import sys

from fusecare.export.bioimageio import main

sys.exit(main())
