"""The write pipeline: bounded queues and group commit over a typed store Protocol."""
