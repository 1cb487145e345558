"""OpenMM's custom energy expressions (Lepton) parsed as OpenMM's Lepton parser does.

Precedence, right-associative ``^``, unary minus binding tighter than ``*`` but looser than
``^``, and ``;``-separated definitions that may use definitions written after them, into a DAG
of :class:`Expr` with structurally equal subexpressions shared. The parser is our own rather
than ``sympy.sympify``: Lepton's names (``or``, ``I``, ``E``, ``gamma``, ``beta``, ``lambda``)
collide with Python keywords and sympy's constants and functions, and Lepton lets a definition
refer to definitions that follow it, which plain substitution order gets wrong.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from .term import UnsupportedForceError

__all__ = ["Expr", "expression_variables", "parse_lepton"]


class Expr:
    """A node of an expression DAG: ``op`` is 'const', 'var', an operator or a function name.

    Nodes are interned (see :func:`_node`): structurally equal subexpressions are the same
    object, so a subexpression used twice is computed once.
    """

    __slots__ = ("op", "args", "value", "__weakref__")

    def __init__(self, op: str, args: tuple, value: Any):
        self.op, self.args, self.value = op, args, value

    def __repr__(self) -> str:
        if self.op == "const":
            return repr(self.value)
        if self.op == "var":
            return str(self.value)
        op = self.op if self.value is None else f"{self.op}[{self.value!r}]"  # addc[2.0](x): x + 2
        return f"{op}({', '.join(map(repr, self.args))})"


def _node(table: dict, op: str, args: tuple = (), value: Any = None) -> Expr:
    """The interned node (op, args, value) of ``table`` (one table per parsed expression)."""
    key = (op, float(value).hex() if isinstance(value, float) else value, tuple(id(a) for a in args))
    node = table.get(key)
    if node is None:
        node = table[key] = Expr(op, args, value)
    return node


# Lepton's built-in functions and their number of arguments.
# fmt: off
_FUNCTIONS = {
    "sqrt": 1, "exp": 1, "log": 1, "sin": 1, "cos": 1, "sec": 1, "csc": 1, "tan": 1, "cot": 1,
    "asin": 1, "acos": 1, "atan": 1, "atan2": 2, "sinh": 1, "cosh": 1, "tanh": 1, "erf": 1,
    "erfc": 1, "step": 1, "delta": 1, "square": 1, "cube": 1, "recip": 1, "min": 2, "max": 2,
    "abs": 1, "floor": 1, "ceil": 1, "select": 3,
}
# fmt: on
_PRECEDENCE = {"+": 0, "-": 0, "*": 1, "/": 1, "^": 3}
_TOKEN = re.compile(
    r"\s*(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)|(?P<fn>[^\s()+\-*/^,]+)\(|"
    r"(?P<var>[^\s()+\-*/^,]+)|(?P<sym>[()+\-*/^,]))"
)


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens, pos, text = [], 0, text.strip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            raise ValueError(f"cannot parse {text[pos:]!r}")
        kind = match.lastgroup
        tokens.append((kind, match.group(kind)))
        pos = match.end()
    return tokens


class _Parser:
    def __init__(
        self, tokens: list[tuple[str, str]], definitions: dict[str, Expr], functions: Mapping[str, int], table: dict
    ):
        self.tokens, self.pos, self.definitions, self.functions, self.table = tokens, 0, definitions, functions, table

    def parse(self) -> Expr:
        expr = self.precedence(0)
        if self.pos != len(self.tokens):
            raise ValueError(f"unexpected {self.tokens[self.pos][1]!r}")
        return expr

    def precedence(self, level: int) -> Expr:
        if self.pos == len(self.tokens):
            raise ValueError("unexpected end of expression")
        kind, text = self.tokens[self.pos]
        self.pos += 1
        if kind == "num":
            result = _node(self.table, "const", value=float(text))
        elif kind == "var":
            result = self.definitions.get(text) or _node(self.table, "var", value=text)
        elif kind == "sym" and text == "(":
            result = self.precedence(0)
            self.expect(")")
        elif kind == "fn":
            args = [self.precedence(0)]
            while self.pos < len(self.tokens) and self.tokens[self.pos] == ("sym", ","):
                self.pos += 1
                args.append(self.precedence(0))
            self.expect(")")
            arity = _FUNCTIONS.get(text, self.functions.get(text))
            if arity is None:
                raise ValueError(f"unknown function {text!r}")
            if arity != len(args):
                raise ValueError(f"{text} takes {arity} arguments, got {len(args)}")
            result = _node(self.table, text, tuple(args))
        elif kind == "sym" and text == "-":
            result = _node(self.table, "neg", (self.precedence(2),))
        else:
            raise ValueError(f"unexpected {text!r}")
        while (
            self.pos < len(self.tokens)
            and self.tokens[self.pos][0] == "sym"
            and self.tokens[self.pos][1] in _PRECEDENCE
        ):
            op = self.tokens[self.pos][1]
            if _PRECEDENCE[op] < level:
                break
            self.pos += 1
            right = self.precedence(_PRECEDENCE[op] + (op != "^"))
            result = _node(self.table, op, (result, right))
        return result

    def expect(self, symbol: str) -> None:
        if self.pos == len(self.tokens) or self.tokens[self.pos] != ("sym", symbol):
            raise ValueError("unbalanced parentheses")
        self.pos += 1


def parse_lepton(text: str, functions: Mapping[str, int] | None = None) -> Expr:
    """Parse an OpenMM (Lepton) energy expression into an :class:`Expr` DAG.

    ``functions``: names and numbers of arguments of tabulated functions. Definitions after
    ``;`` are parsed last first, each seeing those after it, as Lepton does.

    >>> parse_lepton("0.5*k*(r-r0)^2")
    *(*(0.5, k), ^(-(r, r0), 2.0))
    """
    functions = dict(functions or {})
    parts = text.split(";")
    definitions: dict[str, Expr] = {}
    table: dict[tuple, Expr] = {}
    try:
        for part in reversed(parts[1:]):
            if not part.strip():
                continue
            name, equals, body = part.partition("=")
            if not equals or not name.strip():
                raise ValueError(f"definition {part.strip()!r} does not name a variable")
            definitions[name.strip()] = _Parser(_tokenize(body), definitions, functions, table).parse()
        return _Parser(_tokenize(parts[0]), definitions, functions, table).parse()
    except ValueError as error:
        raise UnsupportedForceError(f"cannot parse the expression {text!r}: {error}.") from None


def _postorder(root: Expr) -> list[Expr]:
    order, seen, stack = [], set(), [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if id(node) in seen:
            continue
        if expanded:
            seen.add(id(node))
            order.append(node)
        else:
            stack.append((node, True))
            stack.extend((a, False) for a in reversed(node.args) if id(a) not in seen)
    return order


def expression_variables(root: Expr) -> set[str]:
    """Names of the free variables of an expression."""
    return {node.value for node in _postorder(root) if node.op == "var"}
