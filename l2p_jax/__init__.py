"""l2p-jax: Learn2Perturb and the defenses it is compared with, in JAX/Flax."""
