"""kdqa: task-specific knowledge distillation for extractive question answering.

Where things live:
- data.py        SQuAD v1.1 loading (hub or local JSON / JSON.gz) and validation
- features.py    tokenisation into features (windows, offsets) and the dynamic-padding collator
- postprocess.py span decoding: logits of all windows -> answer text
- metric.py      the official SQuAD v1.1 metric (EM / F1); evaluate.py is its command line
- loss.py        qa_distillation_loss: the fused Triton kernel (kernels/) or its PyTorch reference
- modeling.py    loading teacher/student models, building a student from teacher layers
- config.py      command-line flags and config files of train.py
- trainer.py     the hand-written training loop
"""

__version__ = "0.1.0"
