"""K-FAC factor computation: natgrad versus peer libraries on the same model and batch.

Usage::

    PYTHONPATH=python python benchmarks/kfac_peers.py [--quick] [--out PATH] [--threads N]

For an MLP (784-512-512-10, batch 256) and a small ResNet-style CNN (32x32x3 input, 16-32-64
channels, batch 128), every library computes the K-FAC factors of the empirical Fisher of one
batch (cross-entropy, mean reduction) and is timed on its own "factors for this batch" call,
forward and backward included (median of several runs after a warm-up, 2 threads):

* natgrad: forward + ``loss.backward()`` with natgrad.KFAC's capture hooks, then the factor
  update (``opt.estimator.update_factors``, the part of ``step()`` that refreshes A and G, with
  ``factor_decay=0``); the plain forward + backward without any hook is timed as reference.
* curvlinops ``KFACLinearOperator(fisher_type="empirical", kfac_approx="expand",
  separate_weight_and_bias=False)``: construction + ``compute_kronecker_factors()``.
* BackPACK: ``KFAC(mc_samples=1)`` and ``KFLR`` extensions around ``loss.backward()``. BackPACK
  has no empirical-Fisher K-FAC (KFAC is the MC-sampled and KFLR the exact GGN), so only A is
  compared with natgrad; KFLR's G is compared with curvlinops' ``fisher_type="type-2"`` instead.
* ASDL (PyPI ``asdfghjkl``, module ``asdl``): ``FisherConfig(fisher_type=FISHER_EMP,
  fisher_shapes=[SHAPE_KRON])`` and ``forward_and_backward(calc_loss_grad=True)`` (factors plus
  the parameter gradients, as natgrad's training step).
* nngeometry: ``FIM(..., PMatKFAC, variant="regression")`` with the per-sample losses as the
  function, whose K-FAC is that of the empirical Fisher (it differentiates w.r.t. the inputs
  only, so it computes no parameter gradients).

Agreement: each peer's factors are mapped to natgrad's convention (known scalings, bias
row/column) and the maximum relative difference ``max|X - X_natgrad| / max|X_natgrad|`` over
layers is reported for A and G (float32 round-off is ~1e-6). A missing or failing peer is listed
with its reason. Writes ``benchmarks/results/kfac_peers.json``.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import natgrad  # noqa: E402
from _harness import (  # noqa: E402
    Comparison, Goal, Measurement, _peak_and_time, format_rows, time_fn, write_json)

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kfac_peers.json")
FULL: dict[str, Any] = {"mlp": (784, 512, 512, 10), "mlp_batch": 256, "cnn_channels": (16, 32, 64),
                        "cnn_image": 32, "cnn_batch": 128, "classes": 10, "repeats": 5}
QUICK: dict[str, Any] = {"mlp": (64, 32, 32, 10), "mlp_batch": 32, "cnn_channels": (4, 8, 8),
                         "cnn_image": 8, "cnn_batch": 8, "classes": 10, "repeats": 2}
GOAL = Goal("natgrad's factor computation at least as fast as the fastest peer", min_time_ratio=1.0)

Factors = dict[str, tuple[Tensor | None, Tensor | None]]  # layer name -> (A, G), natgrad layout


# ---- models -----------------------------------------------------------------------------------

def build_mlp(dims: tuple[int, ...]) -> nn.Sequential:
    """Linear-ReLU stack with the given widths (biases everywhere)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    """``relu(x + conv2(relu(conv1(x))))`` with 3x3 convolutions (padding 1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu2(x + self.conv2(self.relu1(self.conv1(x))))


def build_cnn(channels: tuple[int, ...], image: int, classes: int) -> nn.Sequential:
    """ResNet-style CNN: 3x3 stem, then per width a residual block, stride-2 3x3 convolutions
    between widths, average pooling over the final map and a Linear head (no normalization)."""
    layers: list[nn.Module] = [nn.Conv2d(3, channels[0], 3, padding=1), nn.ReLU(), ResBlock(channels[0])]
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU(), ResBlock(c_out)]
    side = image // 2 ** (len(channels) - 1)
    layers += [nn.AvgPool2d(side), nn.Flatten(), nn.Linear(channels[-1], classes)]
    return nn.Sequential(*layers)


def kron_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's Linear and Conv2d layers by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def output_positions(model: nn.Module, x: Tensor) -> dict[str, int]:
    """Weight-sharing positions R (output pixels of Conv2d, 1 for Linear) per layer."""
    out: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: out.__setitem__(
        n, o.shape[2] * o.shape[3] if o.dim() == 4 else 1)) for n, m in kron_layers(model).items()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


# ---- libraries --------------------------------------------------------------------------------

@dataclass
class Runner:
    """One library's factor computation for a fixed model copy and batch.

    Attributes:
        library, method: printed labels.
        fn: computes the factors of the batch; returns them in natgrad's layout (see
            :data:`Factors`; None for a factor that is not comparable).
        convention: how the peer's native factors were mapped to natgrad's.
        g_reference: "natgrad", or another reference for G (then ``g_ref_factors`` holds it).
    """

    library: str
    method: str
    fn: Callable[[], Factors]
    convention: str = "identical to natgrad"
    g_reference: str = "natgrad"
    g_ref_factors: Factors | None = None


def _loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y)


def natgrad_runner(model: nn.Module, x: Tensor, y: Tensor) -> Runner:
    """natgrad.KFAC: hooked forward + backward, then the factor update of a step."""
    opt = natgrad.KFAC(model, lr=0.0, momentum=0.0, factor_decay=0.0, kl_clip=None)

    def fn() -> Factors:
        model.zero_grad(set_to_none=True)
        _loss(model, x, y).backward()
        opt.estimator.update_factors(opt.factor_decay, opt.loss_reduction)  # clears the records
        return {b.name: (b.state["A"], b.state["G"]) for b in opt.estimator.blocks}

    fn.opt = opt  # type: ignore[attr-defined]  (keeps the hooks alive)
    return Runner("natgrad", "KFAC: fwd+bwd (hooks) + factor update", fn)


def plain_runner(model: nn.Module, x: Tensor, y: Tensor) -> Runner:
    """Forward + backward without any curvature hook (reference, no factors)."""
    def fn() -> Factors:
        model.zero_grad(set_to_none=True)
        _loss(model, x, y).backward()
        return {}
    return Runner("(reference)", "plain fwd+bwd, no factors", fn, convention="-")


def curvlinops_runner(model: nn.Module, x: Tensor, y: Tensor) -> Runner:
    """curvlinops KFACLinearOperator (empirical Fisher, expand, bias folded into A)."""
    from curvlinops import KFACLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]

    def fn() -> Factors:
        op = KFACLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)], fisher_type="empirical",
                                kfac_approx="expand", separate_weight_and_bias=False,
                                check_deterministic=False, num_data=x.shape[0],
                                num_per_example_loss_terms=1)
        op.compute_kronecker_factors()
        sd = op.state_dict()
        return {n: (sd["input_covariances"][n], sd["gradient_covariances"][n]) for n in sd["input_covariances"]}

    return Runner("curvlinops", "KFACLinearOperator(empirical, expand)", fn)


def curvlinops_type2(model: nn.Module, x: Tensor, y: Tensor) -> Factors:
    """curvlinops' exact-GGN ("type-2") K-FAC factors (reference for BackPACK's KFLR)."""
    from curvlinops import KFACLinearOperator

    op = KFACLinearOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), [(x, y)],
                            fisher_type="type-2", separate_weight_and_bias=False,
                            check_deterministic=False, num_data=x.shape[0], num_per_example_loss_terms=1)
    op.compute_kronecker_factors()
    return {n: (None, g) for n, g in op.state_dict()["gradient_covariances"].items()}


def backpack_runner(model: nn.Module, x: Tensor, y: Tensor, kind: str) -> Runner:
    """BackPACK's KFAC (MC, 1 sample) or KFLR (exact GGN) extension around loss.backward()."""
    from backpack import backpack, extend
    from backpack.extensions import KFAC, KFLR

    positions = output_positions(model, x)
    ggn_ref = curvlinops_type2(model, x, y) if kind == "KFLR" else None
    names = list(kron_layers(model))
    bp_model = extend(copy.deepcopy(model), use_converter=True)
    bp_layers = list(kron_layers(bp_model).values())
    assert len(bp_layers) == len(names), "BackPACK's converter changed the layer list"
    loss_fn = extend(nn.CrossEntropyLoss())
    ext = KFAC(mc_samples=1) if kind == "KFAC" else KFLR()
    attr = ext.savefield

    def fn() -> Factors:
        bp_model.zero_grad(set_to_none=True)
        with backpack(ext):
            loss_fn(bp_model(x), y).backward()
        out: Factors = {}
        for name, layer in zip(names, bp_layers):
            g, a = getattr(layer.weight, attr)
            out[name] = (a / positions[name], g if kind == "KFLR" else None)
        return out

    if kind == "KFAC":
        return Runner("backpack", "KFAC(mc_samples=1) (MC Fisher)", fn,
                      "A: no bias row/col, Conv2d A = R*A_natgrad; G: MC-sampled, not comparable")
    return Runner("backpack", "KFLR (exact GGN)", fn,
                  "A: no bias row/col, Conv2d A = R*A_natgrad; G is the GGN's", "curvlinops type-2",
                  ggn_ref)


def asdl_runner(model: nn.Module, x: Tensor, y: Tensor) -> Runner:
    """ASDL FisherEmp with SHAPE_KRON; parameter gradients computed in the same backward."""
    import asdl

    cfg = asdl.FisherConfig(fisher_type=asdl.FISHER_EMP, fisher_shapes=[asdl.SHAPE_KRON],
                            loss_type=asdl.LOSS_CROSS_ENTROPY, data_size=x.shape[0])
    maker = asdl.get_fisher_maker(model, cfg)
    layers = kron_layers(model)

    def fn() -> Factors:
        model.zero_grad(set_to_none=True)
        dummy = maker.setup_model_call(model, x)
        maker.setup_loss_call(F.cross_entropy, dummy, y)
        maker.forward_and_backward(calc_loss_grad=True)
        return {n: (m.fisher.kron.A, m.fisher.kron.B) for n, m in layers.items()}

    return Runner("asdl", "FisherEmp, SHAPE_KRON", fn, "A: no bias row/col (bias kept outside A)")


def nngeometry_runner(model: nn.Module, x: Tensor, y: Tensor) -> Runner:
    """nngeometry PMatKFAC of the per-sample losses (= empirical Fisher K-FAC)."""
    from nngeometry.layercollection import LayerCollection
    from nngeometry.metrics import FIM
    from nngeometry.object import PMatKFAC

    positions = output_positions(model, x)
    lc = LayerCollection.from_model(model)

    def per_sample_loss(inputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(model(inputs), targets, reduction="none").unsqueeze(1)

    def fn() -> Factors:
        kfac = FIM(model, (x.clone(), y), PMatKFAC, variant="regression", function=per_sample_loss,
                   layer_collection=lc)
        # layer ids are the modules' qualified names (LayerCollection.from_model)
        return {name: (a / positions[name], g * positions[name]) for name, (a, g) in kfac.data.items()}

    return Runner("nngeometry", "FIM(PMatKFAC, per-sample loss)", fn,
                  "Conv2d: A = R*A_natgrad, G = G_natgrad/R (A (x) G identical)")


PEERS: list[tuple[str, Callable[[nn.Module, Tensor, Tensor], Runner]]] = [
    ("curvlinops", curvlinops_runner),
    ("backpack KFAC", lambda m, x, y: backpack_runner(m, x, y, "KFAC")),
    ("backpack KFLR", lambda m, x, y: backpack_runner(m, x, y, "KFLR")),
    ("asdl", asdl_runner),
    ("nngeometry", nngeometry_runner),
]


# ---- comparison -------------------------------------------------------------------------------

def max_rel_diff(got: Factors, ref: Factors, which: int) -> float | None:
    """Max over layers of ``max|X - X_ref| / max|X_ref|``; a peer factor without the bias
    row/column is compared with the weight block of the reference. None if not comparable."""
    worst: float | None = None
    for name, pair in got.items():
        x, r = pair[which], ref[name][which]
        if x is None or r is None:
            continue
        r = r.to(x.dtype)[: x.shape[0], : x.shape[1]]
        d = float((x - r).abs().max() / r.abs().max())
        worst = d if worst is None else max(worst, d)
    return worst


@dataclass
class Row:
    """One library on one model."""

    model: str
    library: str
    method: str
    measurement: Measurement | None = None
    a_diff: float | None = None
    g_diff: float | None = None
    g_reference: str = "natgrad"
    convention: str = ""
    skipped: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def run_model(label: str, model: nn.Module, x: Tensor, y: Tensor, repeats: int) -> list[Row]:
    """Times natgrad, the plain fwd+bwd and every importable peer on one model and batch.

    Each library gets its own copy of the model (same weights). After one warm-up call each,
    the libraries are timed round-robin (``repeats`` rounds, one call each per round), so that
    load from other processes on the shared cores hits all of them alike; the median is
    reported. Peak memory comes from one extra profiled call per library.
    """
    print(f"\n{label}: x {tuple(x.shape)}, {sum(p.numel() for p in model.parameters())} parameters")
    rows: list[Row] = []
    live: list[tuple[Row, Runner]] = []
    for key, make in [("natgrad", natgrad_runner), ("plain", plain_runner)] + PEERS:
        try:
            runner = make(copy.deepcopy(model), x, y)
            runner.fn()  # warm-up (and the first failure of an unsupported model)
        except Exception as e:  # noqa: BLE001  (a peer that cannot run is reported, not fatal)
            first = str(e).splitlines()[0][:200] if str(e) else ""
            reason = f"{type(e).__name__}: {first}" if first else type(e).__name__
            print(f"  {key}: not run: {reason}")
            rows.append(Row(label, key, "", skipped=reason))
            continue
        row = Row(label, runner.library, runner.method, convention=runner.convention,
                  g_reference=runner.g_reference)
        rows.append(row)
        live.append((row, runner))
    times: dict[int, list[float]] = {id(r): [] for r, _ in live}
    for _ in range(repeats):
        for row, runner in live:
            t, _ = time_fn(runner.fn, repeats=1, warmup=0)
            times[id(row)] += t
    ref: Factors = {}
    for row, runner in live:  # natgrad first: its factors are the reference
        peak, _, factors = _peak_and_time(runner.fn)
        row.measurement = Measurement(times[id(row)], peak)
        if row.library == "natgrad":
            ref = {n: (a.detach().clone(), g.detach().clone()) for n, (a, g) in factors.items()}
        elif factors:
            row.a_diff = max_rel_diff(factors, ref, 0)
            row.g_diff = max_rel_diff(factors, runner.g_ref_factors or ref, 1)
        print(f"  {row.library} {row.method}: {row.measurement.median_s * 1e3:.1f} ms, A diff "
              f"{_fmt_diff(row.a_diff)}, G diff {_fmt_diff(row.g_diff)} (vs {row.g_reference})")
    return rows


def _fmt_diff(d: float | None) -> str:
    return "n/a" if d is None else f"{d:.1e}"


def _is_peer(r: Row) -> bool:
    return r.library not in ("natgrad", "(reference)") and r.measurement is not None


def goal_comparisons(rows: list[Row]) -> list[Comparison]:
    """natgrad versus each peer as harness Comparisons (time x = peer / natgrad); the goal is
    attached to the fastest peer of each model."""
    out: list[Comparison] = []
    for model in dict.fromkeys(r.model for r in rows):
        mine = [r for r in rows if r.model == model]
        nat = next((r for r in mine if r.library == "natgrad" and r.measurement), None)
        peers = [r for r in mine if _is_peer(r)]
        if nat is None:
            continue
        fastest = min(peers, key=lambda r: r.measurement.median_s, default=None)
        for r in peers:
            out.append(Comparison(
                f"{r.library} {r.method}", model,
                {"a_max_rel_diff": r.a_diff, "g_max_rel_diff": r.g_diff, "g_reference": r.g_reference,
                 "convention": r.convention},
                nat.measurement, r.measurement, baseline_desc=f"{r.library}: {r.method}",
                goal=GOAL if r is fastest else None))
    return out


def print_report(rows: list[Row], comparisons: list[Comparison]) -> None:
    """The side-by-side table, the conventions, the skipped peers and the goal."""
    print("\nK-FAC factors of one batch (empirical Fisher, cross-entropy, mean). ms = median wall "
          "time of the\nlibrary's factor call incl. its forward/backward; x natgrad = library ms / "
          "natgrad ms (>1: natgrad faster);\nA/G diff = max relative difference to natgrad's "
          "factors after matching conventions.\n")
    headers = ["model", "library", "method", "ms", "x natgrad", "peak MB", "A diff", "G diff"]
    table = []
    for r in rows:
        if r.measurement is None:
            continue
        nat = next(n for n in rows if n.model == r.model and n.library == "natgrad")
        ratio = r.measurement.median_s / nat.measurement.median_s if nat.measurement else math.nan
        g = _fmt_diff(r.g_diff) + ("" if r.g_reference == "natgrad" or r.g_diff is None
                                   else f" (vs {r.g_reference})")
        if r.library in ("natgrad", "(reference)"):
            a_txt, g = "-", "-"
        else:
            a_txt = _fmt_diff(r.a_diff)
        table.append([r.model, r.library, r.method, f"{r.measurement.median_s * 1e3:.1f}",
                      f"{ratio:.2f}", f"{r.measurement.peak_bytes / 2**20:.1f}", a_txt, g])
    print(format_rows(headers, table, left={0, 1, 2, 6, 7}))
    print("\nConventions (peer -> natgrad; R = output positions of a Conv2d layer):")
    for lib in dict.fromkeys((r.library, r.method, r.convention) for r in rows if _is_peer(r)):
        print(f"  {lib[0]} {lib[1]}: {lib[2]}")
    skipped = [r for r in rows if r.skipped]
    if skipped:
        print("\nNot run:")
        for r in skipped:
            print(f"  {r.model} / {r.library}: {r.skipped}")
    print(f"\nGoal: {GOAL.text}")
    for c in comparisons:
        if c.goal is not None:
            print(f"  [{'MET' if c.goal_met else 'NOT MET'}] {c.group}: natgrad "
                  f"{c.natgrad.median_s * 1e3:.1f} ms vs fastest peer {c.baseline_desc} "
                  f"{c.baseline.median_s * 1e3:.1f} ms (x{c.time_ratio:.2f})")


def main(argv: list[str] | None = None) -> int:
    """Runs both models and writes the JSON; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test, < 1 minute)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = list(os.getloadavg())
    print(f"torch threads {args.threads}; load average (1/5/15 min) at start: "
          + " ".join(f"{v:.2f}" for v in load_start))
    cfg = QUICK if args.quick else FULL
    warnings.filterwarnings("ignore")  # ASDL's non-full backward hooks, BackPACK's converter
    torch.manual_seed(0)
    mlp = build_mlp(cfg["mlp"])
    xm, ym = torch.randn(cfg["mlp_batch"], cfg["mlp"][0]), torch.randint(0, cfg["mlp"][-1], (cfg["mlp_batch"],))
    cnn = build_cnn(cfg["cnn_channels"], cfg["cnn_image"], cfg["classes"])
    s = cfg["cnn_image"]
    xc, yc = torch.randn(cfg["cnn_batch"], 3, s, s), torch.randint(0, cfg["classes"], (cfg["cnn_batch"],))
    rows = run_model("mlp", mlp, xm, ym, cfg["repeats"])
    rows += run_model("cnn", cnn, xc, yc, cfg["repeats"])
    comparisons = goal_comparisons(rows)
    print_report(rows, comparisons)
    write_json(args.out, comparisons, extra={
        "threads": args.threads, "loadavg_start": load_start, "benchmark": "kfac_peers", "quick": args.quick, "config": cfg,
        "versions": _versions(),
        "rows": [{"model": r.model, "library": r.library, "method": r.method,
                  "median_s": r.measurement.median_s if r.measurement else None,
                  "times_s": r.measurement.times_s if r.measurement else None,
                  "peak_bytes": r.measurement.peak_bytes if r.measurement else None,
                  "a_max_rel_diff": r.a_diff, "g_max_rel_diff": r.g_diff,
                  "g_reference": r.g_reference, "convention": r.convention, "skipped": r.skipped}
                 for r in rows]})
    print(f"\nwrote {args.out}")
    return 0


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for dist in ("curvlinops-for-pytorch", "backpack-for-pytorch", "asdfghjkl", "nngeometry"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


if __name__ == "__main__":
    sys.exit(main())
