"""Pure PyTorch evaluations of a pretrained backbone. May import trainers' builders, never the reverse."""
