"""Tiny name -> object registries (big_vision style).

Routers, balancing losses, dispatch strategies and run modes are all chosen by a string in the config.
Adding one is one decorated function or class:

    ROUTERS = Registry("router")

    @ROUTERS.register("mixtral_topk")
    class MixtralTopK(nnx.Module): ...
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator


class Registry:
  """A named collection of objects; unknown names raise a one-line error listing the known ones."""

  def __init__(self, kind: str):
    self.kind = kind
    self._items: Dict[str, Any] = {}

  def register(self, name: str) -> Callable[[Any], Any]:
    def decorator(obj: Any) -> Any:
      if name in self._items:
        raise ValueError(f"{self.kind} {name!r} is registered twice")
      self._items[name] = obj
      return obj
    return decorator

  def get(self, name: str) -> Any:
    try:
      return self._items[name]
    except KeyError:
      raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items))}") from None

  def __contains__(self, name: str) -> bool:
    return name in self._items

  def __iter__(self) -> Iterator[str]:
    return iter(sorted(self._items))

  def names(self) -> list[str]:
    return sorted(self._items)
