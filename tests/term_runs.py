"""What the extra loss terms' tests share: a tiny distill command line and its one-line error."""

import train


def distill_argv(setup, out, *extra):
    """A 3-step distill of setup's tiny teacher on its synthetic train/dev files, the PyTorch loss, no eval."""
    return ["distill", "--train_file", setup["train"], "--validation_file", setup["dev"], "--output_dir", str(out),
            "--teacher_model_name_or_path", setup["teacher"], "--max_seq_length", "48", "--doc_stride", "16",
            "--loss_impl", "torch", "--disable_tqdm", "--per_device_train_batch_size", "4", "--max_steps", "3",
            "--save_steps", "3", "--logging_steps", "1", "--eval_strategy", "no", "--learning_rate", "1e-3",
            *map(str, extra)]


def error_of(argv, capsys) -> str:
    """train.py's exit with one line on stderr, no traceback: that line."""
    code = train.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "Traceback" not in err[0]
    return err[0]
