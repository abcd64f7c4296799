"""Where the shipped ensembles are, wherever fusecare runs from.

Lookup order (``find_weights``), first match wins:

1. an explicit folder (``--weights DIR``, ``fusecare.restore(..., weights=DIR)``), used even if it
   does not exist, so that a typo is reported instead of silently replaced;
2. the ``FUSECARE_WEIGHTS`` environment variable (the container sets it);
3. ``model_weights/`` of the source checkout this package runs from (a clone, or ``pip install -e``);
4. the copy installed with the package (``fusecare/model_weights/`` in site-packages: ``pip install .``
   puts the repository's ``model_weights/`` there as package data).

When none exists, the checkout's path is returned: each case is then written back unchanged
with one ERROR line naming it (do no harm), as for any missing ensemble.

Standard library only: the command line resolves its defaults before torch is imported.
"""

from __future__ import annotations

import os
from pathlib import Path

WEIGHTS_ENV = "FUSECARE_WEIGHTS"
PACKAGE = Path(__file__).resolve().parents[1]
"""The ``fusecare`` package folder (this module sits one level below it)."""
REPO_WEIGHTS = PACKAGE.parent / "model_weights"
"""``model_weights/`` beside the package: the repository's, when running from a checkout."""
INSTALLED_WEIGHTS = PACKAGE / "model_weights"
"""The package-data copy a wheel installs (absent in a checkout)."""


def find_weights(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The weights folder by the documented lookup order (module docstring)."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        return Path(env)
    for candidate in (REPO_WEIGHTS, INSTALLED_WEIGHTS):
        if candidate.is_dir():
            return candidate
    return REPO_WEIGHTS


def is_checkout() -> bool:
    """True when the package runs from a source checkout (not from site-packages)."""
    return (PACKAGE.parent / "pyproject.toml").is_file()


def training_weights_dir() -> Path:
    """Where ``train`` writes an ensemble by default: the checkout's ``model_weights/``, else
    ``./model_weights`` (never into site-packages, where an installed copy would be overwritten)."""
    return REPO_WEIGHTS if is_checkout() else Path("model_weights")
