"""Data: TFDS builders and data sources fed through grain pipelines."""
