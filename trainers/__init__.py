"""Pure PyTorch: data, augmentation, backbones, heads, methods, the training loop. No Ray, MLflow or submitit."""
