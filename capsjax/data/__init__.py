"""Datasets: TFDS loading, batching and the offline build from the original files."""
