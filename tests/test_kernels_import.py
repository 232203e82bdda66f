"""kdqa's ``kernels/`` folder, imported as ``kdqa.kernels``, and Hugging Face's kernel hub package
(import name ``kernels``) installed side by side: neither breaks the other.

``kernels/`` has no ``__init__.py``, so run from the repository root it is only a namespace portion
and the hub's regular package wins ``import kernels``.  ``kdqa/kernels`` is a symlink to it: the
editable install's finder cannot map a namespace subpackage (setuptools issue 4943), the symlink
makes it a plain subfolder of ``kdqa``; the wheel copies ``kernels/`` to ``kdqa/kernels/``.

transformers imports names from ``kernels`` when the hub's metadata shows a version it supports.
Each case runs in a fresh interpreter against a stand-in hub written to a temporary folder (the
real one is not a dependency): a package ``kernels`` that provides any name and a submodule, with
``dist-info`` metadata at the version transformers asks for.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hub_site(tmp_path_factory):
    try:
        from transformers.utils.import_utils import KERNELS_MIN_VERSION as version
    except ImportError:  # a transformers without hub support: any version will do
        version = "0.18.2"
    site = tmp_path_factory.mktemp("site")
    (site / "kernels").mkdir()
    (site / "kernels" / "__init__.py").write_text(textwrap.dedent('''
        """Stand-in for the kernel hub: any name imports."""
        HUB = True
        from kernels.layer import LayerRepository

        def __getattr__(name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {})
    '''))
    (site / "kernels" / "layer.py").write_text("class LayerRepository:\n    pass\n")
    dist = site / f"kernels-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kernels\nVersion: {version}\n")
    return site


LOSS_RUNS = """
    import pathlib, torch
    import kdqa.kernels.qa_distill
    from kdqa.loss import qa_distillation_loss
    s = torch.randn(2, 9, requires_grad=True)
    p = torch.tensor([1, 2])
    out = qa_distillation_loss(s, s, p, p, s.detach(), s.detach(), impl="triton")
    out.loss.backward()
    print("ours:", pathlib.Path(kdqa.kernels.qa_distill.__file__).resolve())
"""


def _run(code, cwd, pythonpath):
    """Run ``code`` then LOSS_RUNS in a fresh interpreter; its stdout."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(map(str, pythonpath)))
    script = textwrap.dedent(code) + textwrap.dedent(LOSS_RUNS)
    proc = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_run_from_the_repository_root_leaves_kernels_to_the_hub(hub_site):
    """Run from the repository root, our ``kernels/`` folder (no ``__init__.py``: a namespace
    portion) must not hide the hub's regular package from transformers."""
    out = _run("""
        import kernels
        assert kernels.HUB and kernels.LayerRepository is kernels.layer.LayerRepository
        from kernels import get_kernel, CUDAProperties  # names only the hub has
        from transformers.utils.import_utils import is_kernels_available
        assert is_kernels_available(), "the stand-in hub's version is not one transformers uses"
        import transformers.integrations.hub_kernels  # imports a dozen names from kernels
        from transformers import AutoModelForQuestionAnswering
    """, cwd=REPO_ROOT, pythonpath=[hub_site])
    assert f"ours: {REPO_ROOT / 'kernels' / 'qa_distill.py'}" in out


def test_installed_layout_imports_kdqa_kernels_beside_the_hub(hub_site, tmp_path):
    """Installed (the wheel's layout: kernels/ copied to kdqa/kernels/), the loss imports
    ``kdqa.kernels`` and ``kernels`` stays the hub's, first on the path."""
    site = tmp_path / "site"
    shutil.copytree(REPO_ROOT / "kdqa", site / "kdqa", symlinks=False,
                    ignore=shutil.ignore_patterns("__pycache__"))
    assert not (site / "kdqa" / "kernels" / "__init__.py").exists()
    out = _run("""
        import kernels
        assert kernels.HUB, kernels.__file__  # the hub's package, untouched
    """, cwd=tmp_path, pythonpath=[hub_site, site])
    assert f"ours: {site / 'kdqa' / 'kernels' / 'qa_distill.py'}" in out


def test_pyproject_installs_the_folder_as_kdqa_kernels():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        pytest.skip("tomllib needs Python 3.11")
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "kernels" not in config["packages"] and "kdqa.kernels" in config["packages"]
    assert config["package-dir"]["kdqa.kernels"] == "kernels"
    assert not (REPO_ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py would make the folder a regular package that hides the hub's kernels")
