"""Registers CeRA with PEFT in every process that imports peft.

PEFT knows an adapter type only once it is registered, so a serving script that loads a
CeRA adapter (``PeftModel.from_pretrained``, ``AutoModelForCausalLM.from_pretrained``
on an adapter folder) but never imports cera_rs would fail deep in PEFT with
``KeyError: 'CERA'``. The cera_rs wheel installs ``cera_rs_peft_hook.pth``, which
imports this module at interpreter start-up; it imports nothing but ``sys`` and waits
for ``import peft``, then imports cera_rs right after peft has loaded. A process that
never imports peft gets neither torch nor peft nor cera_rs from it.
"""

import sys


class _LoaderThenCera:
    """Runs peft's own loader, then imports cera_rs (which registers itself)."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _AwaitPeft)]
        try:
            import cera_rs  # noqa: F401
        except Exception as err:  # peft itself must keep working
            import warnings

            warnings.warn(
                f"cera_rs is installed but could not register CeRA with peft: {err}",
                stacklevel=2,
            )


class _AwaitPeft:
    """A meta-path finder that answers only for ``peft``: it asks the finders after it
    and wraps the loader they give. It stays until peft has actually been executed, since
    libraries probe for peft with ``importlib.util.find_spec`` long before importing it."""

    def find_spec(self, name, path=None, target=None):
        if name != "peft":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _LoaderThenCera(spec.loader)
                return spec
        return None


def install():
    if "peft" not in sys.modules and not any(isinstance(f, _AwaitPeft) for f in sys.meta_path):
        sys.meta_path.insert(0, _AwaitPeft())


install()
