"""cljax: contrastive and self-supervised image pretraining in JAX."""
