"""Throughput of the spline flow (issue 12): training and sampling, new implementation vs the old one.

The old implementation (the commit before issue 12: ``rq_spline``, ``SplineCoupling``,
``CouplingFlow.forward``/``inverse`` and ``SplineFlow.rsample``/``sample``/``log_prob``) is kept
verbatim in this file as the baseline (``BaselineSplineFlow``); it is built from a new
:class:`~cmt_openmm.flows.SplineFlow` with the same weights and buffers (its state_dict), sharing its
(unchanged) ``CoordinateScaling`` and ``Prior``. ``tests/test_flows.py`` checks that both give
the same log q and samples.

The new flow runs its splines in the compiled loop of ``cmt_openmm/flows/spline_kernel.py`` where a
C++ compiler exists (``CMT_OPENMM_SPLINE_KERNEL=0``: its torch operations instead).

Flow: the preset size (6 layers, hidden 64, depth 2, 8 bins, float32) on aldp-vacuum's 60
internal coordinates, weights perturbed by N(0, 0.05^2) so the splines are not the identity.
Measured at each of ``--batches`` (256, 1,024, 4,096) and ``--threads`` (1, 2):

- ``train``: ``-flow.log_prob(z).mean()``, ``backward()`` and a step of ``torch.optim.Adam`` with its
  defaults (as ``cmt_openmm/training/loop.py``) on a batch of z
  (z sampled once from the flow), per sample;
- ``sample``: ``flow.sample(B)`` (prior sample, coupling layers, log q), per sample.

The implementations alternate (``--rounds`` times, about ``--seconds`` of calls each per
measurement) and every call is timed: the best call is the headline (the machine is shared;
slower calls measure other people's work), with the median call and this process's median CPU
time (all threads) beside it, and the load average before and after. Targets (issue 12): >= 3x
training and >= 2x sampling throughput at every batch size and thread count. ``--compile`` also
tries ``torch.compile`` of the new flow's ``log_prob`` with a backward pass, in a subprocess (it
crashed the interpreter on CPU until the spline stopped reading an ``as_strided`` view when traced;
it is never the default path: it gained ~7 %). Usage:
``python benchmarks/flow_throughput.py [--quick] [--out PATH] [--compile] [--plain-adam]``
(both implementations step ``Adam(fused=True)``, as ``training/loop.py`` does; ``--plain-adam``:
torch's default Adam for both).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform as host
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmt_openmm.flows import SplineFlow

TARGETS = {"train": 3.0, "sample": 2.0}

# ======================================================================================
# Baseline: the implementation before issue 12, verbatim (class names prefixed "Baseline").
# ======================================================================================
_MIN_BIN = 1e-3  # smallest bin width/height, as a fraction of the interval
_MIN_DERIVATIVE = 1e-3
IDENTITY_DERIVATIVE = math.log(math.expm1(1.0 - _MIN_DERIVATIVE))


def rq_spline(
    x: Tensor, bins: Tensor, derivatives: Tensor, periodic: Tensor, inverse: bool = False
) -> tuple[Tensor, Tensor]:
    """Monotone rational-quadratic spline of [0, 1] onto itself, batched over coordinates.

    Args:
        x: (..., D) inputs in [0, 1] (outputs of the forward map when ``inverse``).
        bins: (..., D, 2, K) unconstrained bin widths and heights (softmax; equal values give
            equal bins).
        derivatives: (..., D, K + 1) unconstrained knot derivatives (softplus;
            :data:`IDENTITY_DERIVATIVE` gives slope 1). Equal bins and unit slopes: identity.
        periodic: (D,) bool; where True the derivative at 1 is the one at 0 (circular spline,
            C1 across the seam; the last derivative is unused).
        inverse: apply the inverse map.

    Returns:
        The mapped values (..., D) and log|d out / d in| (..., D) of the map applied.
    """
    k = bins.shape[-1]
    scale = 1.0 - _MIN_BIN * k
    bins = torch.softmax(bins, dim=-1)
    cum = F.pad(torch.cumsum(bins, dim=-1), (1, 0))  # (..., D, 2, K + 1): sum of bins before j
    row = 1 if inverse else 0
    inner_knots = cum[..., row, 1:k] * scale + _MIN_BIN * torch.arange(1, k, dtype=x.dtype, device=x.device)
    idx = (x.unsqueeze(-1) >= inner_knots).sum(-1)  # (..., D) bin index in [0, K - 1]
    pair = idx[..., None, None].expand(*idx.shape, 2, 1).contiguous()  # contiguous: faster gather
    x0, y0 = (cum.gather(-1, pair).squeeze(-1) * scale + _MIN_BIN * idx.unsqueeze(-1).to(x.dtype)).unbind(-1)
    w, h = (bins.gather(-1, pair).squeeze(-1) * scale + _MIN_BIN).unbind(-1)
    following = torch.where(periodic & (idx == k - 1), 0, idx + 1)
    d0, d1 = (F.softplus(derivatives.gather(-1, torch.stack([idx, following], -1))) + _MIN_DERIVATIVE).unbind(-1)
    s = h / w
    slack = d0 + d1 - 2.0 * s

    if inverse:
        dy = x - y0
        a = h * (s - d0) + dy * slack
        b = h * d0 - dy * slack
        c = -s * dy
        theta = (2.0 * c / (-b - torch.sqrt((b * b - 4.0 * a * c).clamp_min(0.0)))).clamp(0.0, 1.0)
        out = x0 + theta * w
    else:
        theta = ((x - x0) / w).clamp(0.0, 1.0)
    t1 = theta * (1.0 - theta)
    denom = s + slack * t1
    if not inverse:
        out = y0 + h * (s * theta * theta + d0 * t1) / denom
    logdet = (
        2.0 * torch.log(s)
        + torch.log(d1 * theta * theta + 2.0 * s * t1 + d0 * (1.0 - theta) ** 2)
        - 2.0 * torch.log(denom)
    )
    return out, (-logdet if inverse else logdet)



class BaselineSplineCoupling(nn.Module):
    """One coupling layer: splines on ``transformed`` coordinates, bins from an MLP of the rest.

    Args:
        transformed, conditioning: (Dt,), (Dc,) long indices into the flow coordinates.
        circular: (dim,) bool, True for coordinates on [-pi, pi).
        lower, upper: (dim,) interval of every coordinate (circular: -pi, pi).
        hidden, depth: MLP width and number of hidden layers.
        n_bins: spline bins K.
        shift: (Dt,) rotation of circular inputs as a fraction of the circle (0 elsewhere).
    """

    def __init__(
        self,
        transformed: Tensor,
        conditioning: Tensor,
        circular: Tensor,
        lower: Tensor,
        upper: Tensor,
        hidden: int,
        depth: int,
        n_bins: int,
        shift: Tensor,
    ) -> None:
        super().__init__()
        self.n_bins = n_bins
        self.register_buffer("transformed", transformed.long())
        self.register_buffer("cond_circular", conditioning[circular[conditioning]].long())
        self.register_buffer("cond_linear", conditioning[~circular[conditioning]].long())
        self.register_buffer("periodic", circular[transformed].clone())
        self.register_buffer("lower", lower[transformed].clone())
        self.register_buffer("width", (upper - lower)[transformed].clone())
        self.register_buffer("shift", torch.where(self.periodic, shift, torch.zeros_like(shift)))
        n_features = max(2 * len(self.cond_circular) + len(self.cond_linear), 1)
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(n_features if i == 0 else hidden, hidden), nn.SiLU()]
        last = nn.Linear(hidden if depth > 0 else n_features, len(transformed) * (3 * n_bins + 1))
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        with torch.no_grad():  # identity spline: equal bins, unit slopes
            last.bias[len(transformed) * 2 * n_bins :] = IDENTITY_DERIVATIVE
        self.net = nn.Sequential(*layers, last)

    def _features(self, y: Tensor) -> Tensor:
        if len(self.cond_circular) + len(self.cond_linear) == 0:
            return y.new_ones(y.shape[0], 1)
        angles = y[:, self.cond_circular]
        return torch.cat([torch.cos(angles), torch.sin(angles), y[:, self.cond_linear]], dim=-1)

    def forward(self, y: Tensor, inverse: bool = False) -> tuple[Tensor, Tensor]:
        """Map y (B, dim) -> (B, dim); returns it and log|det| (B,) of the map applied."""
        params = self.net(self._features(y))  # (B, Dt * 2K) bins, then (B, Dt * (K + 1)) slopes
        n, k = len(self.transformed), self.n_bins
        bins = params[:, : n * 2 * k].view(-1, n, 2, k)
        derivatives = params[:, n * 2 * k :].view(-1, n, k + 1)
        u = (y[:, self.transformed] - self.lower) / self.width + self.shift
        u = torch.where(self.periodic, u - torch.floor(u), u)
        v, logdet = rq_spline(u, bins, derivatives, self.periodic, inverse)
        v = v - self.shift
        v = torch.where(self.periodic, v - torch.floor(v), v)
        return y.index_copy(1, self.transformed, self.lower + v * self.width), logdet.sum(-1)




class BaselineCouplingFlow(nn.Module):
    """The old ``CouplingFlow``: its layers rebuilt from a new flow's, forward/inverse verbatim."""

    def __init__(self, layers: list[BaselineSplineCoupling]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, y0: Tensor) -> tuple[Tensor, Tensor]:
        """Prior sample y0 (B, dim) -> y (B, dim), log|det dy/dy0| (B,)."""
        logdet = y0.new_zeros(y0.shape[0])
        for layer in self.layers:
            y0, ld = layer(y0)
            logdet = logdet + ld
        return y0, logdet

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Data y (B, dim) -> y0 (B, dim), log|det dy0/dy| (B,)."""
        logdet = y.new_zeros(y.shape[0])
        for layer in reversed(self.layers):
            y, ld = layer(y, inverse=True)
            logdet = logdet + ld
        return y, logdet



class BaselineSplineFlow(nn.Module):
    """The old ``SplineFlow`` methods on ``flow``'s scaling and prior and a copy of its weights."""

    def __init__(self, flow: SplineFlow) -> None:
        super().__init__()
        self.scaling, self.prior = flow.scaling, flow.prior
        circular = flow.scaling.circular
        dtype = flow.dtype
        lower, upper = flow.scaling.lower.to(dtype), flow.scaling.upper.to(dtype)
        layers = []
        with torch.random.fork_rng(devices=[]):  # nn.Linear's initialisation; overwritten below
            for layer in flow.couplings.layers:
                linears = [m for m in layer.net if isinstance(m, nn.Linear)]
                depth = len(linears) - 1
                hidden = linears[0].out_features if depth > 0 else 1
                conditioning = torch.cat([layer.cond_circular, layer.cond_linear]).sort()[0]
                old = BaselineSplineCoupling(layer.transformed, conditioning, circular, lower, upper, hidden,
                                             depth, layer.n_bins, layer.shift).to(dtype)
                old.load_state_dict(layer.state_dict(), strict=True)
                layers.append(old)
        self.couplings = BaselineCouplingFlow(layers)

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the coupling layers."""
        return self.couplings.layers[0].lower.dtype

    @property
    def dim(self) -> int:
        return len(self.scaling.circular)

    def rsample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n samples z (n, dim) float64 and log q_z(z) (n,) float64, differentiable."""
        y0 = self.prior.sample(n, generator)
        y, logdet = self.couplings(y0.to(self.dtype))
        log_q = self.prior.log_prob(y0) - logdet.double() + self.scaling.log_det
        # float32 rounding may step ~1e-7 past an interval end: clamp (density unaffected)
        y = torch.minimum(torch.maximum(y.double(), self.scaling.lower), self.scaling.upper)
        return self.scaling.from_flow(y), log_q

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Like :meth:`rsample`, without gradients."""
        return self.rsample(n, generator)

    def log_prob(self, z: Tensor) -> Tensor:
        """log q_z(z) (B,) float64 of z (B, dim); -inf outside the support or for non-finite z."""
        y = self.scaling.to_flow(z)
        ok = self.scaling.inside(y) & torch.isfinite(y).all(-1)
        y = torch.where(ok[:, None], y, torch.zeros_like(y))
        y = torch.minimum(torch.maximum(y, self.scaling.lower), self.scaling.upper).to(self.dtype)
        y0, logdet = self.couplings.inverse(y)
        log_q = self.prior.log_prob(y0) + logdet.double() + self.scaling.log_det
        return torch.where(ok, log_q, torch.full_like(log_q, -math.inf))


# ======================================================================================
# The benchmark
# ======================================================================================
def build_flows(dtype: torch.dtype = torch.float32, perturb: float = 0.05, seed: int = 0):
    """(new SplineFlow, BaselineSplineFlow with the same weights, aldp-vacuum's coordinates)."""
    from cmt_openmm.generator import BoltzmannGenerator
    from cmt_openmm.systems import get_target

    generator = BoltzmannGenerator.build(get_target("aldp-vacuum"), n_layers=6, hidden=64, n_bins=8, dtype=dtype)
    flow = generator.flow
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(perturb * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return flow, BaselineSplineFlow(flow), generator.coordinates


def _timed(fn, calls: int) -> tuple[list[float], float]:
    """Wall seconds of each of ``calls`` calls, and CPU seconds (this process, all threads) per call."""
    walls, cpu = [], time.process_time()
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
    return walls, (time.process_time() - cpu) / calls


def measure(flows: dict[str, nn.Module], z: Tensor, batch: int, rounds: int, seconds: float,
            fused_adam: bool = False) -> dict:
    """Per-sample microseconds of train and sample, per implementation: the best call (the cost
    without interference from other work on the machine), the median call, and the median CPU time
    (this process, all threads). The implementations alternate, ``rounds`` times, each round timing
    about ``seconds / rounds`` of calls of each."""
    zb = z[:batch].clone()
    optimizers = {name: torch.optim.Adam(flow.parameters(), lr=1e-5, fused=fused_adam or None)
                  for name, flow in flows.items()}
    generators = {name: torch.Generator().manual_seed(1) for name in flows}

    def train(name):
        flow, optimizer = flows[name], optimizers[name]

        def step():
            optimizer.zero_grad(set_to_none=True)
            (-flow.log_prob(zb).mean()).backward()
            optimizer.step()
        return step

    def sample(name):
        flow, generator = flows[name], generators[name]
        return lambda: flow.sample(batch, generator)

    results: dict = {}
    for task, make in (("train", train), ("sample", sample)):
        calls = {name: make(name) for name in flows}
        per_round = {}
        for name, fn in calls.items():  # warm-up; calls per round from the time of one call
            fn()
            per_call = _timed(fn, 1)[0][0]
            per_round[name] = max(1, round(seconds / rounds / max(per_call, 1e-6)))
        walls = {name: [] for name in flows}
        cpus = {name: [] for name in flows}
        for _ in range(rounds):
            for name, fn in calls.items():
                wall, cpu = _timed(fn, per_round[name])
                walls[name] += [w / batch * 1e6 for w in wall]
                cpus[name].append(cpu / batch * 1e6)
        r = results[task] = {
            name: {"us_per_sample_best": min(walls[name]), "us_per_sample_median": statistics.median(walls[name]),
                   "cpu_us_per_sample_median": statistics.median(cpus[name]), "calls": len(walls[name])}
            for name in flows
        }
        r["speedup_best"] = r["baseline"]["us_per_sample_best"] / r["new"]["us_per_sample_best"]
        r["speedup_median"] = r["baseline"]["us_per_sample_median"] / r["new"]["us_per_sample_median"]
        r["speedup_cpu"] = r["baseline"]["cpu_us_per_sample_median"] / r["new"]["cpu_us_per_sample_median"]
    return results


def agreement(flow: nn.Module, baseline: nn.Module, n: int = 512) -> dict:
    """Largest |difference| new vs baseline: log q of the same z, and samples (z, log q) from the same seed."""
    z, log_q = flow.sample(n, torch.Generator().manual_seed(3))
    z_old, log_q_old = baseline.sample(n, torch.Generator().manual_seed(3))
    with torch.no_grad():
        lp, lp_old = flow.log_prob(z), baseline.log_prob(z)
    return {"log_prob_max_abs_diff": float((lp - lp_old).abs().max()),
            "sample_log_q_max_abs_diff": float((log_q - log_q_old).abs().max()),
            "sample_z_max_abs_diff": float((z - z_old).abs().max())}


_COMPILE_SCRIPT = r"""
import sys, time, torch
sys.path.insert(0, {root!r})
sys.path.insert(0, {bench!r})
import flow_throughput as ft
torch.set_num_threads({threads})
flow, _, _ = ft.build_flows()
z, _ = flow.sample({batch}, torch.Generator().manual_seed(0))
compiled = torch.compile(flow.log_prob)
opt = torch.optim.Adam(flow.parameters(), lr=1e-5)
def step(fn):
    opt.zero_grad(set_to_none=True); (-fn(z).mean()).backward(); opt.step()
t0 = time.perf_counter(); step(compiled); first = time.perf_counter() - t0
best = {{}}
for name, fn in (("eager", flow.log_prob), ("compiled", compiled)):
    step(fn); ts = []
    for _ in range({repeats}):
        t0 = time.perf_counter(); step(fn); ts.append(time.perf_counter() - t0)
    best[name] = min(ts) / {batch} * 1e6
print("RESULT", first, best["eager"], best["compiled"])
"""


def try_compile(threads: int, batch: int, repeats: int, timeout: float = 600.0) -> dict:
    """torch.compile(flow.log_prob) + backward + Adam, in a subprocess (a crash only ends that)."""
    here = Path(__file__).resolve().parent
    script = _COMPILE_SCRIPT.format(root=str(here.parent), bench=str(here), threads=threads, batch=batch,
                                    repeats=repeats)
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    if proc.returncode != 0 or not lines:
        if proc.returncode < 0:
            error = f"killed by signal {-proc.returncode}" + (" (segmentation fault)" if proc.returncode == -11 else "")
        else:
            found = [line for line in proc.stderr.splitlines() if "Error" in line]
            error = (found or proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "returncode": proc.returncode, "error": error}
    first, eager, compiled = map(float, lines[-1].split()[1:])
    return {"ok": True, "threads": threads, "batch": batch, "compile_and_first_step_s": first,
            "train_us_per_sample_eager": eager, "train_us_per_sample_compiled": compiled}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5, help="alternations of the implementations per measurement")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="about this long per implementation and measurement (at least one call per round)")
    parser.add_argument("--quick", action="store_true", help="batch 256, 1 thread, 2 short rounds (a few seconds)")
    parser.add_argument("--compile", action="store_true",
                        help="also try torch.compile(flow.log_prob) + backward, in a subprocess")
    parser.add_argument("--plain-adam", dest="fused_adam", action="store_false",
                        help="torch's default Adam for both implementations (training/loop.py uses fused=True)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.threads, args.rounds, args.seconds = [256], [1], 2, 0.1
    threads_before = torch.get_num_threads()
    load_before = os.getloadavg()

    flow, baseline, _ = build_flows()
    flows = {"baseline": baseline, "new": flow}
    z, _ = flow.sample(max(args.batches), torch.Generator().manual_seed(0))
    check = agreement(flow, baseline)
    rows = []
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch in args.batches:
                rows.append({"threads": threads, "batch": batch,
                             **measure(flows, z, batch, args.rounds, args.seconds, args.fused_adam)})
    finally:
        torch.set_num_threads(threads_before)
    worst = {task: min(row[task]["speedup_best"] for row in rows) for task in TARGETS}
    report = {
        "system": "aldp-vacuum",
        "flow": {"n_layers": 6, "hidden": 64, "depth": 2, "n_bins": 8, "dtype": "float32", "dim": flow.dim,
                 "circular": int(flow.scaling.circular.sum()), "perturbation": 0.05},
        "torch": torch.__version__, "python": host.python_version(), "cpu": host.processor() or host.machine(),
        "cores": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "rounds": args.rounds, "seconds": args.seconds, "fused_adam": args.fused_adam, "agreement": check,
        "targets": TARGETS, "worst_speedup": worst,
        "meets_targets": all(worst[task] >= TARGETS[task] for task in TARGETS), "results": rows,
    }
    if args.compile:
        report["compile"] = try_compile(threads=1, batch=1024, repeats=3)

    print(f"log q, new vs baseline (same weights): max |diff| {check['log_prob_max_abs_diff']:.1e} (log_prob), "
          f"{check['sample_log_q_max_abs_diff']:.1e} (sample); samples {check['sample_z_max_abs_diff']:.1e}")
    print("microseconds per sample: best call (median call); x = baseline / new, best calls")
    header = (f"{'threads':>7} {'batch':>5} | {'train old':>15} {'train new':>15} {'x':>5} | "
              f"{'sample old':>15} {'sample new':>15} {'x':>5}")
    print(header)
    print("-" * len(header))
    for row in rows:
        cells = []
        for task in ("train", "sample"):
            r = row[task]
            cells += [f"{r[name]['us_per_sample_best']:6.1f} ({r[name]['us_per_sample_median']:6.1f})"
                      for name in ("baseline", "new")]
            cells.append(f"{r['speedup_best']:5.2f}")
        print(f"{row['threads']:>7} {row['batch']:>5} | {cells[0]:>15} {cells[1]:>15} {cells[2]:>5} | "
              f"{cells[3]:>15} {cells[4]:>15} {cells[5]:>5}")
    print("worst speed-up: " + ", ".join(f"{t} {worst[t]:.2f}x (target {TARGETS[t]:.0f}x)" for t in TARGETS)
          + f"; load average {load_before[0]:.1f} -> {report['load_average_after'][0]:.1f} on {os.cpu_count()} cores")
    if "compile" in report:
        print("torch.compile (subprocess):", json.dumps(report["compile"]))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
