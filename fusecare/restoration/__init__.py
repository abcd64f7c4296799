"""Restoration: from one single-view volume to its fused-quality estimate.

The CARE network (``model``), its members loaded and checked as an ensemble (``ensemble``,
weights found by ``weights``), tiled prediction with exact stitching (``tiling``), the do-no-harm
gate toward the input (``gate``) and the attenuation field it may multiply by (``attenuation``),
how a case fits the host's memory (``planning``) and its time budget (``pacing``), intensities in
and out as uint16 (``intensities``), and the per-case pipeline that reads, restores and writes
(``pipeline``). Everything the submission container runs lives here, on the ground floor's io and
normalisation, so its image needs nothing that training, scoring or export pull in.

Importing this package imports nothing: each module is imported where it is used, so the
command line's ``--help`` stays free of torch.
"""
