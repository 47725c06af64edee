"""Snakemake executor plugin: run jobs on a warm pool of Vast.ai instances."""
