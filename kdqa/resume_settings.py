"""The settings that shape a run, recorded in its checkpoints and compared on resume.

A resumed run must train exactly as the interrupted one would have: a new --learning_rate,
--seed or --gradient_accumulation_steps taken silently would give a model that neither run
describes. So every flag is recorded in each checkpoint and a changed one is refused, naming the
flag, except the few that only change what is logged, evaluated or kept, or where outputs go.
"""

from __future__ import annotations

import json

# Flags a resumed run may change, and why that is safe.
SAFE_TO_CHANGE = {
    "logging_steps": "how often the loss is logged",
    "eval_strategy": "when the dev set is scored",
    "eval_steps": "when the dev set is scored",
    "save_steps": "how often checkpoints are written",
    "save_total_limit": "how many checkpoints are kept",
    "save_strategy": "when checkpoints are written",
    "logging_strategy": "how often the loss is logged",
    "report_to": "where the logged records also go (TensorBoard)",
    "tensorboard_run": "recipe: the stage's TensorBoard run under a shared log folder",
    "logging_dir": "where the TensorBoard events go",
    "local_rank": "ignored (torchrun's LOCAL_RANK is read), and differs between ranks",
    "disable_tqdm": "progress bars",
    "dataloader_num_workers": "loader processes (the batches are the same)",
    "preprocessing_num_workers": "tokenisation processes (the features are the same)",
    "per_device_eval_batch_size": "evaluation batch size (the scores are the same)",
    "output_dir": "where outputs go",
    "overwrite_output_dir": "ignored on resume",
    "resume_from_checkpoint": "the checkpoint itself",
    "config": "the values it set are compared one by one",
    "device": "compared as the device type (cpu/cuda), recorded separately",
    "teacher_logits_cache": "where the cached logits live (whether a cache is used is compared)",
    # What runs after training (issue 16's prediction), not the training itself:
    "do_predict": "prediction after training",
    "test_file": "prediction after training",
    "max_predict_samples": "prediction after training",
    # The recipe's own flags, copied into each stage's settings: what they decide (data files, sizes)
    # is compared through the stage's resolved flags (--train_file, --max_train_samples, ...).
    "data_dir": "recipe: where data is looked for (the files found are compared)",
    "full": "recipe: the preset's sizes (the sizes themselves are compared)",
    "speed_test_questions": "recipe: the speed test after training",
}


def _comparable(value):
    """JSON round trip: what a checkpoint stores, so a tuple equals its list and floats stay exact."""
    return json.loads(json.dumps(value, default=str))


def run_settings(args, device_type: str) -> dict:
    """Every setting of args that shapes the training, as stored in a checkpoint."""
    settings = {k: _comparable(v) for k, v in sorted(vars(args).items()) if k not in SAFE_TO_CHANGE}
    settings["device_type"] = device_type
    settings["uses_teacher_logits_cache"] = bool(getattr(args, "teacher_logits_cache", None))
    return settings


def _flag(name: str) -> str:
    return {"device_type": "--device", "uses_teacher_logits_cache": "--teacher_logits_cache"}.get(name, f"--{name}")


def changed_settings(saved: dict, current: dict) -> list[str]:
    """'--flag: now X, checkpoint Y' for every setting that differs (keys both sides know)."""
    return [f"{_flag(k)}: now {current[k]!r}, in the checkpoint {saved[k]!r}"
            for k in sorted(set(saved) & set(current)) if saved[k] != current[k]]


def check_resume_settings(saved: dict, args, device_type: str, checkpoint: str) -> None:
    """Refuse to resume with a changed setting that shapes the run; the message names the flag(s)."""
    from kdqa.checkpoint import CheckpointError

    changes = changed_settings(saved, run_settings(args, device_type))
    if changes:
        raise CheckpointError(
            f"cannot resume from {checkpoint} with changed settings ({'; '.join(changes)}): the run would "
            "continue differently from how it began. Resume with the checkpoint's values, or start over with "
            "--overwrite_output_dir. Only these may change on resume: "
            + ", ".join(f"--{k}" for k in SAFE_TO_CHANGE if k not in ("config", "overwrite_output_dir",
                                                                   "resume_from_checkpoint", "tensorboard_run"))
        )
