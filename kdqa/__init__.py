"""kdqa: task-specific knowledge distillation for extractive question answering (map: README.md, Layout)."""

__version__ = "0.1.0"
