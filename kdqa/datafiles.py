"""Finding SQuAD v1.1 on this machine, so the main command runs without --train_file/--validation_file.

The places, in order: --data_dir, then $KDQA_DATA_DIR, then data/squad/ in the repository (git-ignored:
where users drop the official files), then ../shared/data/squad/ beside the checkout. The first folder
holding both a train and a dev file under their official names wins. A folder the user named
(--data_dir or $KDQA_DATA_DIR) that holds no SQuAD is an error, not a reason to quietly read another.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

from kdqa.data import SquadDataError

# The folder holding train.py and kdqa/ (a checkout, or an editable install of one).
REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR_ENV = "KDQA_DATA_DIR"
# Official names; the train file may carry a suffix (e.g. train-v1.1-reconstructed.json.gz).
TRAIN_PATTERNS = ("train-v1.1.json", "train-v1.1.json.gz", "train-v1.1*.json", "train-v1.1*.json.gz")
DEV_PATTERNS = ("dev-v1.1.json", "dev-v1.1.json.gz")
EXPECTED_NAMES = "train-v1.1*.json[.gz] and dev-v1.1.json[.gz]"


@dataclass
class SquadFiles:
    """The files found, the folder and why that folder (for the banner), and every place looked at."""

    train_file: str
    validation_file: str
    folder: str
    source: str
    looked_at: list[str] = field(default_factory=list)


def _first_match(folder: str, patterns: tuple[str, ...]) -> str | None:
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.join(glob.escape(folder), pattern)))
        if matches:
            return matches[0]
    return None


def candidate_folders(data_dir: str | None = None, repo_root: str | os.PathLike | None = None,
                      environ=None) -> list[tuple[str, str, bool]]:
    """(folder, why it is looked at, named by the user) in search order."""
    environ = os.environ if environ is None else environ
    places = []
    if data_dir:
        places.append((os.path.abspath(data_dir), "--data_dir", True))
    if environ.get(DATA_DIR_ENV):
        places.append((os.path.abspath(environ[DATA_DIR_ENV]), f"${DATA_DIR_ENV}", True))
    root = Path(REPO_ROOT if repo_root is None else repo_root)
    places.append((str(root / "data" / "squad"), "data/squad/ in the repository", False))
    places.append((str((root.parent / "shared" / "data" / "squad").resolve()), "../shared/data/squad/ beside the "
                   "checkout", False))
    return places


def find_squad_files(data_dir: str | None = None, repo_root: str | os.PathLike | None = None,
                     environ=None) -> SquadFiles:
    """The train and dev files of the first place that holds both; SquadDataError naming every place if none."""
    looked_at = []
    for folder, why, named in candidate_folders(data_dir, repo_root, environ):
        looked_at.append(f"{folder} ({why})")
        train = _first_match(folder, TRAIN_PATTERNS) if os.path.isdir(folder) else None
        dev = _first_match(folder, DEV_PATTERNS) if os.path.isdir(folder) else None
        if train and dev:
            return SquadFiles(train, dev, folder, why, looked_at)
        if named:
            missing = " and no ".join(n for n, f in (("train file", train), ("dev file", dev)) if not f)
            state = "does not exist" if not os.path.isdir(folder) else f"holds no {missing}"
            raise SquadDataError(
                f"{why} {folder} {state} (SQuAD v1.1 under its official names: {EXPECTED_NAMES}). Put the files "
                f"there, or give --train_file and --validation_file."
            )
    raise SquadDataError(
        "no local SQuAD files were given and the Hugging Face hub cannot be reached to download the dataset "
        "'squad'. Without internet, give SQuAD v1.1 JSON files (.json or .json.gz) with "
        f"--train_file/--validation_file, or put the official files ({EXPECTED_NAMES}) into one of the places "
        "looked at: " + "; ".join(looked_at)
    )
