"""Data: the synthetic head-and-neck phantom, clinical records, reports, image I/O, MONAI transforms, datalists."""
