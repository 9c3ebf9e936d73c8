"""The domain: kinds, batches, decoding, validation, step order, the data model. Pure."""
