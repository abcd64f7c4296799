"""``python -m fusecare.export``: the same command as ``fusecare export``.

Through ``fusecare.cli.export`` rather than ``bioimageio.main``, so ``--help`` and usage errors
answer before torch and bioimageio are imported.
"""

import sys

from fusecare.cli.export import build_parser, run

sys.exit(run(build_parser("python -m fusecare.export").parse_args()))
