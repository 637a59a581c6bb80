"""Datasets: TFDS loading, batching, the download, and the offline build from the original files."""
