"""Integrations of FwPKM with other libraries (optional extras; nothing here is imported by the
core package).

- ``fwpkm_ext.integrations.transformers``: retrofit Hugging Face ``transformers`` (5.x) decoder
  models with FwPKM sublayers (``pip install "fwpkm_ext[hf]"``). See docs/TRANSFORMERS.md.
"""
