"""OpenMM's custom energy expressions (Lepton) compiled to torch, evaluated as OpenMM does.

An expression parsed into a DAG of :class:`Expr` (:func:`parse_lepton`, :mod:`.lepton_parse`)
is first simplified exactly as OpenMM's Lepton simplifies it before evaluating anything
(:func:`~.lepton_optimize.optimize`, twice, as OpenMM's platforms do: ``h/h`` is 1 even where
the global ``h`` is 0), then compiled to a list of torch operations (:class:`LeptonExpression`).
Subexpressions that do not depend on the dynamic variables (parameters, global parameters at
their defaults, constants, tabulated-function lookups on parameters) are evaluated once, in
float64, at construction; the rest run on whatever tensors the caller passes, broadcasting as
torch does (per-term parameters (P, 1) against variables (P, b), per-particle ones (n, 1, 1)
and (1, n, 1) against (n, n, b)); a static operand is a Python float for arithmetic and a 0-d
tensor for every function (``select`` on a global parameter, a table called with a constant).
:func:`pair_symmetric` tells whether a pair expression is unchanged when particles 1 and 2
swap, for the forces whose pair order OpenMM leaves to the platform. Units are the caller's
(OpenMM's MD units for every force here).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import numpy as np
import openmm
import torch

from .lepton_derivative import differentiate
from .lepton_optimize import NeverOptimizedError, optimize
from .lepton_parse import Expr, _postorder, expression_variables, parse_lepton
from .term import OpenMMWouldHangError, UnsupportedForceError

__all__ = [
    "DiscreteTable",
    "Expr",
    "LeptonExpression",
    "as_tensor_like",
    "expression_variables",
    "pair_symmetric",
    "parse_lepton",
    "tabulated_functions",
]


class DiscreteTable:
    """An OpenMM Discrete1D/2D/3DFunction: ``values[i + nx*(j + ny*k)]`` at indices rounded
    half away from zero and clamped to the table, as OpenMM's Reference platform does with C's
    ``(int) round(x)``: on x86 a NaN or an index beyond the int range (+inf) converts to INT_MIN,
    so the table's first entry; no gradient."""

    def __init__(self, function: Any):
        if isinstance(function, openmm.Discrete1DFunction):
            values = function.getFunctionParameters()
            self.shape, self.values = (len(values),), np.asarray(values, float)
        else:
            *sizes, values = function.getFunctionParameters()
            self.shape, self.values = tuple(int(s) for s in sizes), np.asarray(values, float)
        self.arity = len(self.shape)
        square = self.values.reshape(self.shape[::-1]) if self.arity == 2 else None
        self.symmetric = square is not None and self.shape[0] == self.shape[1] and np.array_equal(square, square.T)
        self._tensors: dict[tuple, torch.Tensor] = {}

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        flat, stride = None, 1
        for arg, size in zip(args, self.shape):
            rounded = torch.where(arg >= 0, torch.floor(arg + 0.5), torch.ceil(arg - 0.5))
            rounded = torch.where(rounded < 2.0**31, rounded, torch.zeros_like(rounded))  # NaN, >= 2^31: INT_MIN
            index = rounded.clamp(0, size - 1).long()
            flat = index * stride if flat is None else flat + index * stride
            stride *= size
        key = (args[0].device, args[0].dtype)
        if key not in self._tensors:
            self._tensors[key] = torch.as_tensor(self.values, dtype=args[0].dtype, device=args[0].device)
        return self._tensors[key][flat]


def tabulated_functions(force: Any, label: str) -> dict[str, DiscreteTable]:
    tables = {}
    for k in range(force.getNumTabulatedFunctions()):
        function, name = force.getTabulatedFunction(k), force.getTabulatedFunctionName(k)
        if not isinstance(function, (openmm.Discrete1DFunction, openmm.Discrete2DFunction, openmm.Discrete3DFunction)):
            raise UnsupportedForceError(
                f"{label} uses the tabulated function {name!r} of type {type(function).__name__}, which the torch "
                "backend does not implement (only Discrete1D/2D/3DFunction)."
            )
        tables[name] = DiscreteTable(function)
    return tables


def as_tensor_like(value: Any, like: torch.Tensor) -> torch.Tensor:
    return (
        value if isinstance(value, torch.Tensor) else torch.full((), float(value), dtype=like.dtype, device=like.device)
    )


def _select(c, a, b):
    return torch.where(c != 0, a, b)


# Lepton's min and max are comparisons, not IEEE minimum/maximum: a NaN first argument gives the
# second, a NaN second argument gives NaN (OpenMM Reference: max(log(-1), r) = r, max(r, log(-1)) = NaN)
def _min(a, b):
    return torch.where(a < b, a, b)


def _max(a, b):
    return torch.where(a > b, a, b)


def _power(exponent: Any) -> Callable:
    """x^exponent for a static exponent: small integer powers by multiplication (as Lepton)."""
    if isinstance(exponent, float):
        if exponent == 2.0:
            return lambda a, _: a * a
        if exponent == 3.0:
            return lambda a, _: a * a * a
        if exponent == 4.0:
            return lambda a, _: (a * a) * (a * a)
        if exponent == 6.0:
            return lambda a, _: (a * a * a) * (a * a * a)
        if exponent == 0.5:
            return lambda a, _: torch.sqrt(a)
        if exponent == -1.0:
            return lambda a, _: torch.reciprocal(a)
        if exponent == 1.0:
            return lambda a, _: a
    return lambda a, b: a**b


def _constant_operation(node: Expr) -> Callable:
    """Lepton's AddConstant, MultiplyConstant and PowerConstant (see :mod:`.lepton_optimize`)."""
    c = node.value
    if node.op == "addc":
        return lambda a: a + c
    if node.op == "mulc":
        return lambda a: a * c
    return lambda a: a**c


# fmt: off
_OPS: dict[str, Callable] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b,
    "^": lambda a, b: a**b,
    "neg": lambda a: 0.0 - a,  # as OpenMM's compiled code (0 - x): -(+0) is +0, so atan2(-(0), -1) = pi
    "sqrt": torch.sqrt, "exp": torch.exp, "log": torch.log, "sin": torch.sin, "cos": torch.cos,
    "tan": torch.tan, "asin": torch.asin, "acos": torch.acos, "atan": torch.atan,
    "sinh": torch.sinh, "cosh": torch.cosh, "tanh": torch.tanh, "erf": torch.erf,
    "erfc": torch.erfc, "abs": torch.abs, "floor": torch.floor, "ceil": torch.ceil,
    "sec": lambda a: 1.0 / torch.cos(a),
    "csc": lambda a: 1.0 / torch.sin(a),
    "cot": lambda a: 1.0 / torch.tan(a),
    "step": lambda a: (a >= 0).to(a.dtype),
    "delta": lambda a: (a == 0).to(a.dtype),
    "square": lambda a: a * a,
    "cube": lambda a: a * a * a,
    "recip": torch.reciprocal,
    "min": _min,
    "max": _max,
    "atan2": torch.atan2,
    "select": _select,
}
# fmt: on
# operators that take a Python float for a static operand; every other function gets a 0-d tensor
_ARITHMETIC = frozenset(("+", "-", "*", "/", "^"))


def _table_derivative(*args):
    """A Discrete table's derivative in any argument (OpenMM's evaluateDerivative: 0)."""
    return torch.zeros_like(torch.broadcast_tensors(*args)[0])


# Lepton folds constants with std::min / std::max ((b < a) ? b : a, (a < b) ? b : a), where its
# compiled code (and _min / _max) compares the other way round for a NaN, and negates with -x
_FOLDED = {
    "min": lambda a, b: torch.where(b < a, b, a),
    "max": lambda a, b: torch.where(a < b, b, a),
    "neg": lambda a: -a,
}


def _fold(node: Expr, args: tuple[float, ...]) -> float:
    """A builtin operation on constants, in float64, as Lepton's constant folding evaluates it."""
    if node.op in ("addc", "mulc", "powc"):
        function = _constant_operation(node)
    else:
        function = _FOLDED.get(node.op, _OPS[node.op])
    return float(function(*[torch.tensor(a, dtype=torch.float64) for a in args]))


class LeptonExpression:
    """An expression compiled to torch for given static and dynamic variables.

    ``static``: variables known at construction (floats, or float64 tensors that broadcast
    with the dynamic ones, e.g. per-particle parameters); every subexpression that depends
    only on them is evaluated once, here, in float64. ``dynamic``: names supplied at each
    call as tensors. ``tables``: tabulated functions by name. A variable that is neither is
    refused with :class:`UnsupportedForceError` (``label`` names the force).
    ``derivatives``: dynamic variables whose derivative OpenMM computes (its forces), each in
    ``self.derivatives[name]``, a compiled expression of the same variables written as OpenMM
    writes it (:mod:`.lepton_derivative`), not autograd's.

    >>> e = LeptonExpression(parse_lepton("k*(r-r0)^2"), {"k": 2.0, "r0": 0.1}, ["r"], derivatives=["r"])
    >>> r = torch.tensor([0.2], dtype=torch.float64)
    >>> e({"r": r}), e.derivatives["r"]({"r": r})
    (tensor([0.0200], dtype=torch.float64), tensor([0.4000], dtype=torch.float64))
    """

    def __init__(
        self,
        root: Expr,
        static: Mapping[str, Any],
        dynamic: Iterable[str],
        tables: Mapping[str, DiscreteTable] | None = None,
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
        label: str = "expression",
        derivatives: Iterable[str] = (),
        optimized: bool = False,
    ):
        tables = dict(tables or {})
        dynamic = set(dynamic)
        try:  # as OpenMM: an energy is parse().optimize(), optimized once more to compile; its
            # derivatives differentiate the first and are optimized once (``optimized``: done)
            once = root if optimized else optimize(root, _fold)
            root = optimize(once, _fold)
        except NeverOptimizedError:
            raise OpenMMWouldHangError(
                f"{label} has an expression with a constant part that is NaN (such as log(-1), sqrt(-1) or "
                "(-1)^1.5), on which OpenMM's expression optimizer never finishes, so OpenMM would hang creating a "
                "Context with it (fix that part of the expression)."
            ) from None
        self.dynamic_names = sorted(dynamic & expression_variables(root))
        slots: list[Any] = []
        slot_of: dict[int, int] = {}
        constant_slot: dict[tuple[int, bool], int] = {}
        static_value: dict[int, Any] = {}
        steps: list[tuple[Callable, tuple[int, ...], int]] = []
        inputs: dict[str, int] = {}
        for node in _postorder(root):
            if node.op == "const":
                static_value[id(node)] = float(node.value)
                continue
            if node.op == "var":
                name = node.value
                if name in dynamic:
                    slot_of[id(node)] = inputs[name] = len(slots)
                    slots.append(None)
                elif name in static:
                    value = static[name]
                    static_value[id(node)] = (
                        value.to(torch.float64) if isinstance(value, torch.Tensor) else float(value)
                    )
                else:
                    raise UnsupportedForceError(
                        f"{label} uses the variable {name!r}, which the torch backend does not know."
                    )
                continue
            if node.op in tables:
                function: Callable = tables[node.op]
            elif node.op in ("addc", "mulc", "powc"):
                function = _constant_operation(node)
            elif node.op == "tabd":  # a Discrete table's derivative: 0
                function = _table_derivative
            elif node.op == "^" and id(node.args[1]) in static_value and id(node.args[0]) not in static_value:
                function = _power(static_value[id(node.args[1])])
            else:
                function = _OPS[node.op]
            if all(id(a) in static_value for a in node.args):  # fold: evaluate once, in float64
                args = [torch.as_tensor(static_value[id(a)], dtype=torch.float64) for a in node.args]
                value = function(*args)
                static_value[id(node)] = float(value) if value.dim() == 0 else value
                continue
            arg_slots = []
            for a in node.args:
                if id(a) in slot_of:
                    arg_slots.append(slot_of[id(a)])
                    continue
                # a static operand: a constant slot in the compute dtype, a float for arithmetic
                # (Python scalars are cheapest there), else a tensor (torch.where, floor, tables)
                v = static_value[id(a)]
                key = (id(a), isinstance(v, torch.Tensor) or node.op not in _ARITHMETIC)
                if key not in constant_slot:
                    constant_slot[key] = len(slots)
                    slots.append(torch.as_tensor(v, dtype=dtype, device=device) if key[1] else v)
                arg_slots.append(constant_slot[key])
            slot_of[id(node)] = len(slots)
            slots.append(None)
            steps.append((function, tuple(arg_slots), slot_of[id(node)]))
        self._slots, self._steps, self._inputs = slots, steps, inputs
        self.derivatives = {
            name: LeptonExpression(
                differentiate(once, name), static, dynamic, tables, dtype=dtype, device=device, label=label,
                optimized=True,
            )
            for name in derivatives
        }
        if id(root) in static_value:
            value = static_value[id(root)]
            self.constant = value.to(device=device, dtype=dtype) if isinstance(value, torch.Tensor) else value
        else:
            self.constant = None
            self._result = slot_of[id(root)]

    def __call__(self, values: Mapping[str, torch.Tensor]) -> Any:
        if self.constant is not None:
            return self.constant
        slots = list(self._slots)
        for name, slot in self._inputs.items():
            slots[slot] = values[name]
        for function, args, out in self._steps:
            slots[out] = function(*[slots[a] for a in args])
        return slots[self._result]


# arguments that commute, for the structural symmetry test
_COMMUTATIVE = frozenset(("+", "*", "min", "max"))


def _canonical(root: Expr, rename: Mapping[str, str], tables: Mapping[str, DiscreteTable]) -> str:
    """A text of ``root`` with variables renamed and the arguments of commutative operations (and
    of symmetric square 2D tables) sorted: equal texts are equal expressions."""
    text: dict[int, str] = {}
    for node in _postorder(root):
        if node.op == "const":
            text[id(node)] = float(node.value).hex()
            continue
        if node.op == "var":
            text[id(node)] = rename.get(node.value, node.value)
            continue
        args = [text[id(a)] for a in node.args]
        table = tables.get(node.op)
        if node.op in _COMMUTATIVE or (table is not None and table.symmetric):
            args.sort()
        text[id(node)] = f"{node.op}({','.join(args)})"
    return text[id(root)]


def pair_symmetric(
    root: Expr,
    per_particle: Mapping[str, np.ndarray],
    static: Mapping[str, float],
    tables: Mapping[str, DiscreteTable],
    r_max: float,
) -> bool:
    """Whether a pair energy of ``r`` and per-particle variables ``name1``/``name2`` is unchanged
    when particles 1 and 2 swap: structurally (the same expression up to commuting arguments),
    else numerically (1e-10 relative) for every two distinct rows of the particles' values
    (``per_particle``: name -> (n,)) at 32 distances 0.05..``r_max`` nm. ``static``: global
    parameters."""
    rename = {f"{name}{k}": f"{name}{3 - k}" for name in per_particle for k in (1, 2)}
    if _canonical(root, rename, tables) == _canonical(root, {}, tables):
        return True
    names = sorted(per_particle)
    rows = np.unique(np.stack([np.asarray(per_particle[name], float) for name in names], 1), axis=0)
    first, second = np.triu_indices(len(rows), 1)
    r = torch.linspace(0.05, r_max, 32, dtype=torch.float64)[None, :]
    for start in range(0, len(first), 2048):
        i, j = first[start : start + 2048], second[start : start + 2048]
        energies = []
        for a, b in ((i, j), (j, i)):
            values = {**static}
            for k, name in enumerate(names):
                values[f"{name}1"] = torch.as_tensor(rows[a, k][:, None])
                values[f"{name}2"] = torch.as_tensor(rows[b, k][:, None])
            e = LeptonExpression(root, values, {"r"}, tables)({"r": r})
            energies.append(torch.as_tensor(e, dtype=torch.float64).expand(len(i), r.shape[1]))
        e, swapped = energies
        same = torch.isclose(e, swapped, rtol=1e-10, atol=1e-12, equal_nan=True)
        if not bool(same.all()):
            return False
    return True
