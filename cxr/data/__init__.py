"""Data in: reading and checking images, the held-out split and manifest, the latent cache, dataset lists, phantoms."""
