"""The loaders: the base loader and ``build_loader``, the epoch plan, augmentation, the DALI
backend (graph and loader) and the DataLoader baseline."""
