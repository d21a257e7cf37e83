# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""How this package imports its heavy dependencies.

- Lazy package exports (PEP 562), as diffusers' own `__init__` does, so that `starflow-v --help` and the other
  command-line entry points answer without importing torch and diffusers (seconds on a small machine).
- Quiet first imports of diffusers' model code and PEFT: they import torchao when it is installed (a test
  dependency). Without CUDA, torchao logs that its CUDA kernels cannot load, torch warns about its enums and
  diffusers about torchao tensor classes of old checkpoints: nothing to act on. Those loggers are silenced
  while the import runs, then restored.
"""

import contextlib
import importlib
import logging
from typing import Callable, Dict, Iterator, List, Sequence, Tuple


_QUIET_AT_IMPORT = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")


@contextlib.contextmanager
def quiet_third_party_import() -> Iterator[None]:
    levels = {name: logging.getLogger(name).level for name in _QUIET_AT_IMPORT}
    for name in _QUIET_AT_IMPORT:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def lazy_exports(
    package: str, exports: Dict[str, Sequence[str]]
) -> Tuple[Callable[[str], object], Callable[[], List[str]], List[str]]:
    """`__getattr__`, `__dir__` and `__all__` for `package`, whose `exports` map submodule -> public names.

    The first access to any public name imports every listed submodule, so that after it all classes are
    registered and resolvable by name, the way `from_pretrained` looks them up.
    """
    owner = {name: module for module, names in exports.items() for name in names}
    public = sorted(owner)
    loaded: Dict[str, object] = {}

    def import_every_module() -> None:
        with quiet_third_party_import():
            for module in exports:
                imported = importlib.import_module(f"{package}.{module}")
                for name in exports[module]:
                    loaded[name] = getattr(imported, name)

    def __getattr__(name: str) -> object:
        if name not in owner:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        if not loaded:
            import_every_module()
        return loaded[name]

    def __dir__() -> List[str]:
        return public

    return __getattr__, __dir__, public
