"""Shared pieces of cifar-cam: data, augmentation, model, checkpoint, plots, options."""
