"""Training: making an ensemble from Fuse My Cells pairs, simulated single views, or both.

``config`` (one ``TrainConfig`` per run), ``pairs`` (FMC pairs on disk, patches of one pair),
``simulate`` and ``phantoms`` (single views made from clean volumes), ``sources`` (what a config
names, built into patch sources and validation cases), ``losses``, ``distributed`` (torchrun),
``loop`` (one member), ``members`` (K members into the layout inference reads) and
``calibration`` (choosing the gate on validation volumes). Restoration never imports training;
training uses restoration's network, tiling and gate, and scoring's N-SSIM.

Importing this package imports nothing: ``fusecare.training.simulate`` does not load torch.
"""
