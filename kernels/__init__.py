"""Attention kernels (Triton) and their plain-PyTorch references. No Diffusers import here."""
