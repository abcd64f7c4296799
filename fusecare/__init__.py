"""fusecare: fused-quality lightsheet volumes from a single view with a CARE 3-D U-Net ensemble."""

__version__ = "0.1.0"
