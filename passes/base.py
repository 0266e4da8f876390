"""Pass contract: ``Pass.call(graph) -> PassResult(graph, modified)``.

Passes are functional: they never mutate the graph they are given (they work on
``graph.copy()``), so a caller can always compare before and after. ``requires`` and
``ensures`` hooks may check pre/postconditions; failures raise InvariantError naming the
pass. :class:`PassManager` runs a list of passes, verifies the IR after each, and re-raises
errors with the name of the failing pass and those that ran before it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from qcompile.errors import InvariantError, QCompileError
from qcompile.ir import Graph, verify

__all__ = ["Pass", "PassResult", "PassManager"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassResult:
    graph: Graph
    modified: bool


class Pass:
    """Base class. Subclasses implement :meth:`call`; the docstring numbers its rewrites."""

    name: str = ""

    def requires(self, graph: Graph) -> None:  # pragma: no cover - default no-op
        """Raise InvariantError when ``graph`` does not meet the pass's precondition."""

    def ensures(self, graph: Graph) -> None:  # pragma: no cover - default no-op
        """Raise InvariantError when the output breaks the pass's postcondition."""

    def call(self, graph: Graph) -> PassResult:
        raise NotImplementedError

    def __call__(self, graph: Graph) -> PassResult:
        self.requires(graph)
        result = self.call(graph)
        if result.graph is graph and result.modified:
            raise InvariantError(f"pass {self.pass_name} modified its input graph in place")
        verify(result.graph)
        self.ensures(result.graph)
        return result

    @property
    def pass_name(self) -> str:
        return self.name or type(self).__name__


class PassManager:
    def __init__(self, steps: Sequence[Pass]):
        self.steps = list(steps)

    def __call__(self, graph: Graph) -> PassResult:
        modified = False
        done: list[str] = []
        for step in self.steps:
            try:
                result = step(graph)
            except QCompileError as err:
                if isinstance(err, InvariantError):
                    raise InvariantError(f"{step.pass_name} (after {done}): {err}") from err
                raise
            logger.info("%s: modified=%s", step.pass_name, result.modified)
            graph, modified = result.graph, modified or result.modified
            done.append(step.pass_name)
        return PassResult(graph, modified)
