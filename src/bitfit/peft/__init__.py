"""BitFit as a first-class peft method, and the peft-format adapter folder.

```python
import bitfit.peft                      # registers peft method "bitfit"
from bitfit.peft import BitFitPeftConfig
from peft import get_peft_model

model = get_peft_model(model, BitFitPeftConfig(task_type="SEQ_CLS", preset="all"))
```

``import bitfit.peft`` registers the method with peft when peft (an optional extra:
``pip install bitfit[peft]``) is installed; ``to_bitfit`` / ``from_bitfit`` / ``convert`` work
without it. ``import bitfit`` never imports peft. See docs/PEFT.md.
"""

import importlib
import importlib.util

from .convert import convert, from_bitfit, to_bitfit

# peft-backed names load (and register the method with peft) on first use
_LAZY = {"BitFitPeftConfig": "model", "BitFitModel": "model", "register": "model"}


def __getattr__(name):
    if name in _LAZY:
        try:
            module = importlib.import_module(f".{_LAZY[name]}", __name__)
        except ImportError as exc:
            if exc.name == "peft":
                raise ImportError("bitfit.peft needs the 'peft' library (>=0.21): pip install 'bitfit[peft]'") from None
            raise
        return getattr(module, name)
    raise AttributeError(f"module 'bitfit.peft' has no attribute {name!r}")


if importlib.util.find_spec("peft") is not None:  # `import bitfit.peft` registers the method when peft is there
    try:
        from .model import BitFitModel, BitFitPeftConfig, register  # noqa: E402,F401
    except ImportError:  # a peft too old: the names above then raise the explanation on use
        pass


__all__ = ["BitFitPeftConfig", "BitFitModel", "register", "to_bitfit", "from_bitfit", "convert"]
