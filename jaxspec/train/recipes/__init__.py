"""Reproducible training recipes (`python -m jaxspec.train.recipes.<name>`)."""
