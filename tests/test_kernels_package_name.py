"""kdqa's ``kernels/`` folder and Hugging Face's kernel hub package (import name ``kernels`` too)
installed side by side: neither breaks the other.

transformers imports names from ``kernels`` when the hub's metadata shows a version it supports.
Each case runs in a fresh interpreter against a stand-in hub written to a temporary folder (the
real one is not a dependency): a package ``kernels`` that provides any name and a submodule, with
``dist-info`` metadata at the version transformers asks for.
"""

import os
import pathlib
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
    import torch
    from kdqa.loss import load_kernel, qa_distillation_loss
    s = torch.randn(2, 9, requires_grad=True)
    p = torch.tensor([1, 2])
    out = qa_distillation_loss(s, s, p, p, s.detach(), s.detach(), impl="triton")
    out.loss.backward()
    print("ours:", load_kernel().__file__)
"""


def _run(code, cwd, pythonpath):
    """Run ``code`` then LOSS_RUNS in a fresh interpreter; its stdout."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(map(str, pythonpath)))
    script = textwrap.dedent(code) + textwrap.dedent(LOSS_RUNS)
    proc = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout




def test_checkout_run_from_its_root_serves_the_hub_to_transformers(hub_site):
    """A command run from the repository root sees our folder as ``kernels`` first: transformers
    must still get the hub's names, and we our kernel."""
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


def test_installed_kdqa_finds_its_kernels_beside_the_hub(hub_site, tmp_path):
    """Installed, our folder is ``kdqa_kernels`` (pyproject.toml), and the hub is ``kernels``,
    first on the path: the loss loads ours, and ``kernels`` stays the hub's."""
    installed = tmp_path / "installed"
    installed.mkdir()
    (installed / "kdqa_kernels").symlink_to(REPO_ROOT / "kernels", target_is_directory=True)
    (installed / "kdqa").symlink_to(REPO_ROOT / "kdqa", target_is_directory=True)
    out = _run("""
        import kernels
        assert kernels.HUB, kernels.__file__  # the hub's package, untouched
    """, cwd=tmp_path, pythonpath=[hub_site, installed])
    assert f"ours: {installed / 'kdqa_kernels' / 'qa_distill.py'}" in out


def test_pyproject_installs_the_folder_as_kdqa_kernels():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        pytest.skip("tomllib needs Python 3.11")
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "kernels" not in config["packages"] and "kdqa_kernels" in config["packages"]
    assert config["package-dir"]["kdqa_kernels"] == "kernels"
