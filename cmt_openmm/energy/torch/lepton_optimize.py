"""OpenMM's algebraic simplification of a parsed Lepton expression, mirrored rule for rule.

OpenMM never evaluates an expression as written: every platform compiles
``Parser::parse(text).optimize()``, and the compiled expression optimizes once more. The
optimizer folds subexpressions of literal constants and rewrites by structure, with global
and per-particle parameters still symbols, so some rewrites change values where the written
expression is not finite: ``h/h`` is 1 and ``h-h`` is 0 even where the global ``h`` is 0 or
a subexpression is infinite, ``0*x`` and ``0/x`` are 0, ``0^x`` is 0 (also ``0^0``),
``x^0`` is 1, ``square(sqrt(x))`` is ``x`` for negative ``x``, ``sqrt(square(x))`` is
``abs(x)``. To give OpenMM's energies (the fuzz test found ``select(square(g), h/h, ...)``
with h = 0: finite in OpenMM, NaN evaluated as written) the torch compiler runs the same
rewrites on our :class:`~.lepton_parse.Expr` DAG before it folds parameters into numbers.

The rules, their order, the one rule applied per node per pass, the passes repeated until a
pass changes nothing, and the tree equality they test (``+`` and ``*`` compared either way
round) follow Lepton's ``ParsedExpression::optimize``, ``precalculateConstantSubexpressions``
and ``substituteSimplerExpression`` (OpenMM 8). Lepton's constant operations are nodes here
too: ``addc[c](x)`` is x + c, ``mulc[c](x)`` is x * c, ``powc[c](x)`` is x^c.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .lepton_parse import _FUNCTIONS, Expr, _node

__all__ = ["BUILTIN", "NeverOptimizedError", "optimize"]

# operations Lepton folds when every argument is a constant; anything else is a tabulated
# function, which Lepton never folds
BUILTIN = frozenset(_FUNCTIONS) | {"+", "-", "*", "/", "^", "neg", "addc", "mulc", "powc"}
_SYMMETRIC = frozenset(("+", "*"))


def _ratio(a: float, b: float) -> float:
    """a / b as C++ doubles divide (x/0 is ±inf or NaN, not an exception)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(a) / np.float64(b))


class NeverOptimizedError(ValueError):
    """An expression on which Lepton's optimizer never finishes: after folding it keeps a NaN
    constant (``log(-1)``, ``sqrt(-1)``, ``(-1)^1.5``), which Lepton's tree equality finds
    unequal to itself, so its loop "until a pass changes nothing" never ends (OpenMM hangs
    creating a Context)."""


class _Optimizer:
    """One Lepton ``optimize()`` over nodes interned in ``table``; ``fold(node, values)`` is a
    builtin operation evaluated on constant arguments (float64)."""

    def __init__(self, fold: Callable[[Expr, tuple[float, ...]], float]):
        self.fold, self.table, self.nan = fold, {}, {}

    def has_nan(self, node: Expr) -> bool:
        """Whether a constant or a constant operation's value in ``node`` is NaN."""
        if id(node) not in self.nan:
            own = isinstance(node.value, float) and node.value != node.value
            self.nan[id(node)] = own or any(self.has_nan(a) for a in node.args)
        return self.nan[id(node)]

    def equal(self, a: Expr, b: Expr) -> bool:
        """Lepton's tree equality: the same operation and value, and equal arguments, in either
        order for ``+`` and ``*``; a NaN equals nothing, so neither does a tree holding one."""
        if a is b:  # interned: the same structure
            return not self.has_nan(a)
        if a.op != b.op or len(a.args) != len(b.args) or a.value != b.value:
            return False
        if a.op in _SYMMETRIC:
            (a0, a1), (b0, b1) = a.args, b.args
            return (self.equal(a0, b0) and self.equal(a1, b1)) or (self.equal(a0, b1) and self.equal(a1, b0))
        return all(self.equal(x, y) for x, y in zip(a.args, b.args))

    def node(self, op: str, *args: Expr, value=None) -> Expr:
        return _node(self.table, op, args, value)

    def const(self, value: float) -> Expr:
        return self.node("const", value=float(value))

    def precalculate(self, node: Expr, memo: dict[int, Expr]) -> Expr:
        if id(node) in memo:
            return memo[id(node)]
        args = tuple(self.precalculate(a, memo) for a in node.args)
        if node.op in ("const", "var") or node.op not in BUILTIN or any(a.op != "const" for a in args):
            result = self.node(node.op, *args, value=node.value)
        else:
            result = self.const(self.fold(node, tuple(a.value for a in args)))
        memo[id(node)] = result
        return result

    def substitute(self, node: Expr, memo: dict[int, Expr]) -> Expr:
        """One bottom-up pass: the arguments simplified, then at most one rule at ``node``."""
        if id(node) in memo:
            return memo[id(node)]
        args = tuple(self.substitute(a, memo) for a in node.args)
        result = self.rule(node, args)
        if result is None:
            result = self.node(node.op, *args, value=node.value)
        memo[id(node)] = result
        return result

    def rule(self, node: Expr, c: tuple[Expr, ...]) -> Expr | None:  # noqa: C901 (Lepton's switch)
        op, n = node.op, self.node
        first = c[0].value if c and c[0].op == "const" else None
        second = c[1].value if len(c) > 1 and c[1].op == "const" else None
        if op == "+":
            if first is not None:
                return c[1] if first == 0.0 else n("addc", c[1], value=first)
            if second is not None:
                return c[0] if second == 0.0 else n("addc", c[0], value=second)
            if c[1].op == "neg":
                return n("-", c[0], c[1].args[0])
            if c[0].op == "neg":
                return n("-", c[1], c[0].args[0])
        elif op == "-":
            if self.equal(c[0], c[1]):
                return self.const(0.0)
            if first == 0.0:
                return n("neg", c[1])
            if second is not None:
                return c[0] if second == 0.0 else n("addc", c[0], value=-second)
            if c[1].op == "neg":
                return n("+", c[0], c[1].args[0])
        elif op == "*":
            if first == 0.0 or second == 0.0:
                return self.const(0.0)
            if first == 1.0:
                return c[1]
            if second == 1.0:
                return c[0]
            for k, constant in ((0, first), (1, second)):
                if constant is not None:
                    other = c[1 - k]
                    if other.op == "mulc":
                        return n("mulc", other.args[0], value=constant * other.value)
                    return n("mulc", other, value=constant)
            if c[0].op == "neg" and c[1].op == "neg":
                return n("*", c[0].args[0], c[1].args[0])
            if c[0].op == "neg" and c[1].op == "mulc":
                return n("*", c[0].args[0], n("mulc", c[1].args[0], value=-c[1].value))
            if c[1].op == "neg" and c[0].op == "mulc":
                return n("*", n("mulc", c[0].args[0], value=-c[0].value), c[1].args[0])
            if c[0].op == "neg":
                return n("neg", n("*", c[0].args[0], c[1]))
            if c[1].op == "neg":
                return n("neg", n("*", c[0], c[1].args[0]))
            if c[1].op == "recip":
                return n("/", c[0], c[1].args[0])
            if c[0].op == "recip":
                return n("/", c[1], c[0].args[0])
            if self.equal(c[0], c[1]):
                return n("square", c[0])
            if c[0].op == "square" and self.equal(c[0].args[0], c[1]):
                return n("cube", c[1])
            if c[1].op == "square" and self.equal(c[1].args[0], c[0]):
                return n("cube", c[0])
        elif op == "/":
            if self.equal(c[0], c[1]):
                return self.const(1.0)
            if first == 0.0:
                return self.const(0.0)
            if first == 1.0:
                return n("recip", c[1])
            if second == 1.0:
                return c[0]
            if second is not None:
                if c[0].op == "mulc":
                    return n("mulc", c[0].args[0], value=_ratio(c[0].value, second))
                return n("mulc", c[0], value=_ratio(1.0, second))
            if c[0].op == "neg" and c[1].op == "neg":
                return n("/", c[0].args[0], c[1].args[0])
            if c[1].op == "neg" and c[0].op == "mulc":
                return n("/", n("mulc", c[0].args[0], value=-c[0].value), c[1].args[0])
            if c[0].op == "neg":
                return n("neg", n("/", c[0].args[0], c[1]))
            if c[1].op == "neg":
                return n("neg", n("/", c[0], c[1].args[0]))
            if c[1].op == "recip":
                return n("*", c[0], c[1].args[0])
        elif op == "^":
            if first == 0.0:
                return self.const(0.0)
            if first == 1.0:
                return self.const(1.0)
            if second is not None:
                if second in (0.0, 1.0):
                    return self.const(1.0) if second == 0.0 else c[0]
                named = {-1.0: "recip", 2.0: "square", 3.0: "cube", 0.5: "sqrt"}.get(second)
                return n(named, c[0]) if named else n("powc", c[0], value=second)
        elif op == "neg":
            if c[0].op == "mulc":
                return n("mulc", c[0].args[0], value=-c[0].value)
            if first is not None:
                return self.const(-first)
            if c[0].op == "neg":
                return c[0].args[0]
        elif op == "mulc":
            if c[0].op == "mulc":
                return n("mulc", c[0].args[0], value=node.value * c[0].value)
            if first is not None:
                return self.const(node.value * first)
            if c[0].op == "neg":
                return n("mulc", c[0].args[0], value=-node.value)
        elif op == "sqrt" and c[0].op == "square":
            return n("abs", c[0].args[0])
        elif op == "square" and c[0].op == "sqrt":
            return c[0].args[0]
        elif op == "select" and self.equal(c[1], c[2]):
            return c[1]
        return None

    def __call__(self, root: Expr) -> Expr:
        result, seen = self.precalculate(root, {}), set()
        while True:
            simplified = self.substitute(result, {})
            if self.equal(simplified, result):
                return result
            if id(simplified) in seen:  # a pass repeats a tree (interned: the same object) Lepton
                raise NeverOptimizedError  # finds unequal to itself: a NaN constant; Lepton never stops
            seen.add(id(result))
            result = simplified


def optimize(root: Expr, fold: Callable[[Expr, tuple[float, ...]], float]) -> Expr:
    """Lepton's ``ParsedExpression::optimize()`` of ``root``: constants folded (``fold(node,
    args)`` evaluates a builtin operation on float arguments as OpenMM does), then the
    structural rewrites until none applies; :class:`NeverOptimizedError` where Lepton would loop
    forever.

    >>> from .lepton_parse import parse_lepton
    >>> optimize(parse_lepton("h/h*(0*x + 2*(3*r))"), None)
    mulc[6.0](r)
    """
    return _Optimizer(fold)(root)
