"""Self-supervised SMIT pretraining on folders of raw CT scans.

Data side: ``discovery`` finds usable scans (NIfTI, NRRD, MetaImage, DICOM series, nnU-Net raw datasets),
``cache`` preprocesses them once into a resumable blosc2 cache, ``phantoms`` generates CT-like test and
demo data. Submodules are imported explicitly; this package module imports nothing.
"""
