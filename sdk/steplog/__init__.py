"""steplog: log training metrics without ever blocking the training loop."""
