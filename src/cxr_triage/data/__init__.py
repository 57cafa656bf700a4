"""Layer: dataset manifest (ingest, duplicates, splits) and EDA report."""
