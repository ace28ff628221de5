"""Data: sources -> manifest -> MONAI transforms -> batches."""

import logging
import warnings

# MONAI probes for NVIDIA's GPU DICOM codec on every LoadImage; on CPU machines that is noise.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
