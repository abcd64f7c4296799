"""Scoring: the challenge's numbers for restored volumes, and the report that shows them.

``metrics`` (SSIM and N-SSIM, chunked), ``segment`` (cellpose and IoU, N-IoU), ``evaluate``
(three folders paired into cases, each scored or given a one-line reason), ``figures`` (one PNG
per case) and ``report`` (CSV, JSON summary, table, HTML page). Imports run one way:
report -> evaluate -> figures, metrics, segment; scoring never imports restoration or training.

Importing this package imports nothing.
"""
