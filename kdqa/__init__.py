"""kdqa: task-specific knowledge distillation for extractive question answering.

Where things live:
- config.py        command-line flags and config files of train.py; states the mode (finetune / distill)
- data.py          SQuAD v1.1 loading (hub or local JSON / JSON.gz) and validation
- features.py      tokenisation into features (windows, offsets), the dynamic-padding collator
- samplers.py      training batches: shuffling, length grouping, data-parallel shards, mid-epoch resume
- modeling.py      loading teacher/student models, building a student from teacher layers, running a
                   model over length-sorted features
- precision.py     the precision rule and the autocast-or-nothing context
- loss.py          qa_distillation_loss: the fused Triton kernel (kernels/) or its PyTorch reference
- objective.py     the loss: the span term and the extra terms, each with what it needs of the models
- hidden_distill.py the hidden-state term (--alpha_hidden): layer maps, projections, MSE / cosine
- teacher_cache.py the teacher's logits computed once, memory-mapped, keyed by a fingerprint
- trainer.py       the hand-written training loop, in named phases
- checkpoint.py    checkpoints that resume a run exactly
- distributed.py   torchrun process groups and the few collectives the loop needs
- reporting.py     metrics.jsonl, result JSON files, the training curves
- inference.py     the one inference path (PyTorch, int8, ONNX Runtime): predict, evaluate, run_qa's files
- export.py        ONNX export checked against PyTorch, ONNX Runtime int8
- postprocess.py   span decoding: logits of all windows -> answer text
- metric.py        the official SQuAD v1.1 metric (EM / F1); evaluate.py is its command line
- recipe.py        the seed recipe: teacher, student, distilled student, and their table
"""

__version__ = "0.1.0"
