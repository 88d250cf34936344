"""The registry: one object per method, by name. The only place a method is found by its name."""

from __future__ import annotations

from qcompiler.config import METHODS
from qcompiler.errors import ConfigError
from qcompiler.methods.base import Method
from qcompiler.methods.cafeq import Cafeq
from qcompiler.methods.cafeq_gptaq import CafeqGptaq
from qcompiler.methods.gptq import Gptaq, Gptq
from qcompiler.methods.rotate import Rotate
from qcompiler.methods.rtn import Rtn
from qcompiler.methods.sinq import Sinq

REGISTRY: dict[str, Method] = {m.name: m for m in (Rtn(), Rotate(), Sinq(), Cafeq(), Gptq(), Gptaq(), CafeqGptaq())}
assert tuple(REGISTRY) == METHODS, "config.METHODS lists the registered methods, in order"


def get_method(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"method (--method) must be one of {', '.join(REGISTRY)}, got {name!r}") from None
