"""Bottom layer: file formats and configs shared by trainer, converter and data pipeline."""
