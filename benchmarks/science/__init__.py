"""Science: fit quality, features, rotations, anomalies, reconstruction, latent transform, images."""
