"""Data in memory: ``TensorData`` (decoded once, batched by index) and the file formats datasets read."""
