"""Triton kernels of kdqa, and the checks that run on them without a GPU.

Each op file holds its kernel, its launcher and its autograd Function (``qa_distill``);
``compile_check`` compiles them for real GPUs ahead of time and ``launch_count`` counts the
device launches of a piece of code, both on the CPU.
"""
