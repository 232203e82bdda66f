"""Triton kernels of kdqa, and the checks that run on them without a GPU.

Each op file holds its kernel, its launcher and its autograd Function (``qa_distill``);
``compile_check`` compiles them for real GPUs ahead of time and ``launch_count`` counts the
device launches of a piece of code, both on the CPU.

Installed, this folder is the package ``kdqa_kernels`` (see pyproject.toml): ``kernels`` is also
the import name of Hugging Face's kernel hub, which transformers imports when it is installed.
In a checkout, though, this folder is ``kernels`` and comes first on ``sys.path`` when a command
runs from the repository root; it would then hide the hub from transformers, which finds the hub's
version in its metadata and imports names from "kernels" that this package lacks.  So when the
hub is installed, this package also serves it: its folder joins ``__path__`` (after ours: our
module names differ from the hub's) and its ``__init__`` runs here, so ``from kernels import
get_kernel`` gets the hub's function and ``kernels.qa_distill`` stays ours.
"""

import os
import sys


def _hub_init():
    """The hub's ``kernels/__init__.py`` further down ``sys.path``, or None."""
    here = os.path.dirname(os.path.realpath(__file__))
    for entry in sys.path:
        candidate = os.path.join(os.path.realpath(entry or os.getcwd()), "kernels")
        init = os.path.join(candidate, "__init__.py")
        if candidate != here and os.path.isfile(init):
            return init
    return None


def _serve_the_hub():
    hub_init = _hub_init()
    if __name__ != "kernels" or hub_init is None:
        return
    hub_dir = os.path.dirname(hub_init)
    __path__.append(hub_dir)  # noqa: F821 (set by the import system)
    try:
        with open(hub_init, encoding="utf-8") as f:
            exec(compile(f.read(), hub_init, "exec"), globals())  # the hub's names
    except Exception as exc:  # a hub that cannot import must not take our kernels down with it
        __path__.remove(hub_dir)  # noqa: F821
        import warnings

        warnings.warn(f"the kernel hub package at {hub_dir} failed to import ({exc!r}); "
                      "kdqa's kernels are unaffected", RuntimeWarning)


_serve_the_hub()
