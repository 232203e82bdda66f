"""Triton kernels of kdqa. Each op file holds its kernel, its launcher and its autograd Function."""
