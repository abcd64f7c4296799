"""Export: ensembles packaged for other tools (``python -m fusecare.export``); members that read the
attenuation-corrected view, as both shipped ensembles do, are refused.

``bioimageio`` writes and tests a BioImage Model Zoo package per channel; ``zoo_arch`` is the
network's architecture as that package carries it, self-contained (it imports nothing from
fusecare). A package of its own rather than part of restoration: it needs bioimageio.core and
pydantic, which the submission image does not install, and it reads from restoration and
training (phantoms as test inputs) without either depending on it.
"""
