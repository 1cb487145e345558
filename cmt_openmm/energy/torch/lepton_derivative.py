"""OpenMM's derivative of a Lepton expression, mirrored rule for rule, for forces as OpenMM's.

OpenMM's forces do not come from differentiating the values an expression computes, as
autograd would: each platform differentiates the optimized expression symbolically
(``ParsedExpression::differentiate``, every operation's ``differentiate`` rule in Lepton's
Operation.cpp) and evaluates that expression. The two differ where a branch not taken is not
finite: ``max(acos(r), 3.8)`` beyond r = 1 nm has OpenMM's force ``select(step(acos(r) - 3.8),
d acos(r), 0) = 0``, but autograd multiplies the zero gradient of the branch not taken by acos's
infinite derivative (NaN); and ``min(max(r, acos(2)), c)`` has energy c but OpenMM's force is
that of the NaN branch (Lepton's min compares the other way round in its derivative). Written
as Lepton writes them, with its shortcuts for arguments whose derivative is the constant 0,
the derivatives here give OpenMM's forces; the caller optimizes them once
(:func:`~.lepton_optimize.optimize`), as OpenMM's compiled expressions do.

A tabulated function's derivative is the node ``tabd[(name, k)](args)``: the derivative in its
k-th argument, which is 0 for the Discrete tables the compiler supports (their
``evaluateDerivative``), evaluated at run time as OpenMM does (so 0 times an infinite inner
derivative is NaN, as there).
"""

from __future__ import annotations

import math

from .lepton_optimize import BUILTIN
from .lepton_parse import Expr, _node, _postorder

__all__ = ["differentiate"]

_ZERO_DERIVATIVE = frozenset(("step", "delta", "floor", "ceil"))
# d f(u) = f'(u) du for f' written with the argument u, where Lepton gives 0 when du is 0
_CHAIN = {
    "sqrt": lambda n, u: n("mulc", n("recip", n("sqrt", u)), value=0.5),
    "exp": lambda n, u: n("exp", u),
    "log": lambda n, u: n("recip", u),
    "sin": lambda n, u: n("cos", u),
    "cos": lambda n, u: n("neg", n("sin", u)),
    "sec": lambda n, u: n("*", n("sec", u), n("tan", u)),
    "csc": lambda n, u: n("neg", n("*", n("csc", u), n("cot", u))),
    "tan": lambda n, u: n("square", n("sec", u)),
    "cot": lambda n, u: n("neg", n("square", n("csc", u))),
    "asin": lambda n, u: n("recip", n("sqrt", n("-", n("const", value=1.0), n("square", u)))),
    "acos": lambda n, u: n("neg", n("recip", n("sqrt", n("-", n("const", value=1.0), n("square", u))))),
    "atan": lambda n, u: n("recip", n("addc", n("square", u), value=1.0)),
    "sinh": lambda n, u: n("cosh", u),
    "cosh": lambda n, u: n("sinh", u),
    "tanh": lambda n, u: n("-", n("const", value=1.0), n("square", n("tanh", u))),
    "erf": lambda n, u: n("*", n("const", value=2.0 / math.sqrt(math.pi)), n("exp", n("neg", n("square", u)))),
    "erfc": lambda n, u: n("*", n("const", value=-2.0 / math.sqrt(math.pi)), n("exp", n("neg", n("square", u)))),
    "square": lambda n, u: n("mulc", u, value=2.0),
    "cube": lambda n, u: n("mulc", n("square", u), value=3.0),
    "recip": lambda n, u: n("neg", n("recip", n("square", u))),
}


def _is_zero(node: Expr) -> bool:
    return node.op == "const" and node.value == 0.0


def differentiate(root: Expr, variable: str) -> Expr:
    """d root / d ``variable`` as Lepton's ``ParsedExpression::differentiate`` writes it (not
    yet optimized); ``root`` is an optimized expression (:func:`~.lepton_optimize.optimize`).

    >>> from .lepton_parse import parse_lepton
    >>> differentiate(parse_lepton("max(r, 2)"), "r")
    select(step(-(r, 2.0)), 1.0, 0.0)
    """
    table: dict = {}

    def n(op: str, *args: Expr, value=None) -> Expr:
        return _node(table, op, args, value)

    zero = n("const", value=0.0)
    memo: dict[int, Expr] = {}
    for node in _postorder(root):
        memo[id(node)] = _rule(n, zero, node, node.args, [memo[id(a)] for a in node.args], variable)
    return memo[id(root)]


def _rule(n, zero: Expr, node: Expr, c: tuple[Expr, ...], d: list[Expr], variable: str) -> Expr:  # noqa: C901
    op = node.op
    if op == "const":
        return zero
    if op == "var":
        return n("const", value=1.0) if node.value == variable else zero
    if op not in BUILTIN:  # a tabulated function: its partial derivatives times the arguments'
        terms = [n("*", n("tabd", *c, value=(op, k)), dk) for k, dk in enumerate(d) if not _is_zero(dk)]
        result = terms[0] if terms else zero
        for term in terms[1:]:
            result = n("+", result, term)
        return result
    if op in _ZERO_DERIVATIVE:
        return zero
    if op == "+":
        return d[1] if _is_zero(d[0]) else d[0] if _is_zero(d[1]) else n("+", d[0], d[1])
    if op == "-":
        if _is_zero(d[0]):
            return zero if _is_zero(d[1]) else n("neg", d[1])
        return d[0] if _is_zero(d[1]) else n("-", d[0], d[1])
    if op == "*":
        if _is_zero(d[0]):
            return zero if _is_zero(d[1]) else n("*", c[0], d[1])
        if _is_zero(d[1]):
            return n("*", c[1], d[0])
        return n("+", n("*", c[0], d[1]), n("*", c[1], d[0]))
    if op == "/":
        if _is_zero(d[0]):
            if _is_zero(d[1]):
                return zero
            numerator = n("neg", n("*", c[0], d[1]))
        elif _is_zero(d[1]):
            numerator = n("*", c[1], d[0])
        else:
            numerator = n("-", n("*", c[1], d[0]), n("*", c[0], d[1]))
        return n("/", numerator, n("square", c[1]))
    if op == "^":
        return n(
            "+",
            n("*", n("*", c[1], n("^", c[0], n("addc", c[1], value=-1.0))), d[0]),
            n("*", n("*", n("log", c[0]), n("^", c[0], c[1])), d[1]),
        )
    if op == "atan2":
        return n("/", n("-", n("*", c[1], d[0]), n("*", c[0], d[1])), n("+", n("square", c[0]), n("square", c[1])))
    if op in ("min", "max"):
        step = n("step", n("-", c[0], c[1]))
        return n("select", step, d[1], d[0]) if op == "min" else n("select", step, d[0], d[1])
    if op == "select":
        return n("select", c[0], d[1], d[2])
    if op == "addc":
        return d[0]
    if _is_zero(d[0]):  # every remaining operation has one argument and Lepton's shortcut
        return zero
    if op == "neg":
        return n("neg", d[0])
    if op == "mulc":
        return n("mulc", d[0], value=node.value)
    if op == "powc":
        return n("*", n("mulc", n("powc", c[0], value=node.value - 1.0), value=node.value), d[0])
    if op == "abs":
        return n("*", d[0], n("addc", n("mulc", n("step", c[0]), value=2.0), value=-1.0))
    return n("*", _CHAIN[op](n, c[0]), d[0])
