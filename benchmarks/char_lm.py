"""Character-level GPT on Debian's fortunes: AdamW vs natgrad.KFAC (every parameter in a block).

Usage::

    PYTHONPATH=python python benchmarks/char_lm.py [--quick] [--out-dir DIR] [--seeds N]

Data: the text of Debian's ``fortunes`` package (``apt-get install fortunes``; files under
``/usr/share/games/fortunes``, about 2.6 MB; scripts/env.sh installs it), characters mapped to a
vocabulary of the printable ASCII set plus newline (anything else becomes ``?``), the first 90%
for training and the last 10% held out. A batch is 32 random windows of 64 characters (the
seed fixes the windows, shared by both optimizers); the loss is the mean next-character cross
entropy over all positions (``KFAC(loss_reduction="token_mean")``).

Model: a pre-norm GPT built from stock PyTorch modules: token nn.Embedding plus a free
nn.Parameter positional embedding, 2 nn.TransformerEncoderLayer (d=64, 4 heads, GELU FFN 256,
no dropout, causal mask with ``is_causal=True`` so attention runs fused), a final LayerNorm and
a linear head. Under natgrad.KFAC, ``describe()`` reports every parameter in a curvature block
(attention q/k/v and out_proj, FFN and head Kronecker, embedding, LayerNorms and the positional
embedding diagonal) and none on the plain gradient; the script checks it.

Protocol: the same number of steps for both optimizers; each gets the same tuning budget, a
grid of 3 settings run on seed 0 (:data:`GRIDS`), the best one by final validation loss; then
seeds 1 and 2 with it. The validation loss (16 fixed batches of the held-out text) is measured
every ``eval_every`` steps outside the timed region; wall-clock is the sum of the timed steps
(batch fetch, forward, backward, optimizer step). Runs alternate between optimizers so that load
from other processes hits both alike. The target is AdamW's seed-mean final validation loss;
"time to target" is the first time KFAC's seed-mean curve reaches it, and the goal is
``KFAC time ≤ 0.7 × AdamW time``. Writes ``char_lm.json`` and ``char_lm.png`` (validation loss
against steps and against seconds) to ``--out-dir`` (default ``benchmarks/results``).

K-FAC's fixed settings come from a hand exploration on seed 0 beyond its grid (final validation
loss after 400 steps, around the grid's best 2.37): damping 1e-2 2.47, 3e-3 2.93; kl_clip 3e-2
2.39, none: diverged (also lr 0.3 with kl_clip 0.1, damping 1e-2); ``linear_approx="reduce"``
2.39; ``fisher_type="mc"`` 2.37 (the script supports it); ``pi_correction=True`` 2.39;
factor_decay 0.8 with inverses every 10 steps 2.38. AdamW got no such exploration, and its best
rate was the top of its grid (1e-2): the comparison favours K-FAC, and K-FAC still lost.

``--quick`` is a smoke test (40 steps, 1 seed, the first grid setting only; < 1 minute).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import natgrad

FORTUNES_DIR = "/usr/share/games/fortunes"
DEFAULT_OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
CONTEXT, BATCH, WIDTH, HEADS, LAYERS = 64, 32, 64, 4, 2
GRIDS = {
    "AdamW": [dict(lr=lr) for lr in (2e-3, 5e-3, 1e-2)],
    "KFAC": [dict(lr=0.1, damping=0.1), dict(lr=0.3, damping=0.3), dict(lr=0.1, damping=0.03)],
}
ADAMW_SETTINGS = dict(betas=(0.9, 0.99), weight_decay=0.01)
KFAC_SETTINGS = dict(momentum=0.9, kl_clip=1e-2, factor_decay=0.95, factor_update_period=5,
                     inverse_update_period=20, loss_reduction="token_mean")


def load_text() -> str:
    """The fortunes package's text, concatenated (files in sorted order)."""
    files = sorted(f for f in glob.glob(os.path.join(FORTUNES_DIR, "*"))
                   if os.path.isfile(f) and not f.endswith((".dat", ".u8")))
    if not files:
        raise SystemExit(f"no fortunes text under {FORTUNES_DIR}: install the Debian package with "
                         "`apt-get install -y fortunes` (scripts/env.sh does it)")
    return "".join(open(f, encoding="latin-1").read() for f in files)


def encode(text: str) -> torch.Tensor:
    """Characters -> indices into :data:`VOCAB` (unknown characters -> ``?``)."""
    table = torch.full((256,), VOCAB.index("?"), dtype=torch.long)
    for i, ch in enumerate(VOCAB):
        table[ord(ch)] = i
    return table[torch.tensor(list(text.encode("latin-1")), dtype=torch.long)]


class CharGPT(nn.Module):
    """Pre-norm GPT from stock modules (see the module docstring)."""

    def __init__(self, vocab: int = len(VOCAB), width: int = WIDTH, heads: int = HEADS,
                 layers: int = LAYERS, context: int = CONTEXT) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(context, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos[:t]
        x = self.blocks(x, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.ln(x))


def batches(data: torch.Tensor, count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of random windows (inputs, next-character targets)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        start = torch.randint(0, len(data) - CONTEXT - 1, (BATCH,), generator=g)
        window = torch.stack([data[s:s + CONTEXT + 1] for s in start.tolist()])
        out.append((window[:, :-1], window[:, 1:]))
    return out


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-character cross entropy over all positions."""
    return F.cross_entropy(model(x).reshape(-1, len(VOCAB)), y.reshape(-1))


def make_optimizer(name: str, model: nn.Module, setting: dict):
    """AdamW or natgrad.KFAC with the fixed settings plus the grid's ``setting``."""
    if name == "AdamW":
        return torch.optim.AdamW(model.parameters(), **ADAMW_SETTINGS, **setting)
    return natgrad.KFAC(model, **KFAC_SETTINGS, **setting)


def plain_gradient_parameters(opt) -> list[str]:
    """describe() rows of parameters on the plain gradient (checked after the first step)."""
    return [line for line in opt.describe().splitlines()[1:] if "plain gradient" in line]


def run(name: str, setting: dict, seed: int, steps: int, eval_every: int, train, val) -> dict:
    """One training run; returns the validation curve against steps and timed seconds."""
    torch.manual_seed(seed)
    model = CharGPT()
    opt = make_optimizer(name, model, setting)
    data = batches(train, steps, seed=1000 + seed)
    curve, elapsed = [], 0.0

    def evaluate(step: int) -> float:
        model.eval()
        with torch.no_grad():
            loss = statistics.fmean(float(lm_loss(model, x, y)) for x, y in val)
        model.train()
        curve.append(dict(step=step, seconds=elapsed, val_loss=loss))
        return loss

    first = evaluate(0)
    for step, (x, y) in enumerate(data, 1):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        if getattr(opt, "fisher_type", None) == "mc":
            opt.sample_fisher(logits)  # labels sampled from the model (one extra backward)
        loss = F.cross_entropy(logits.reshape(-1, len(VOCAB)), y.reshape(-1))
        loss.backward()
        opt.step()
        elapsed += time.perf_counter() - start
        if step == 1 and name == "KFAC" and plain_gradient_parameters(opt):
            raise RuntimeError("parameters on the plain gradient:\n" + "\n".join(plain_gradient_parameters(opt)))
        if step % eval_every == 0 or step == steps:
            value = evaluate(step)
            if not math.isfinite(value) or value > 10 * first:
                curve[-1]["val_loss"] = math.inf
                break
    return dict(optimizer=name, setting=setting, seed=seed, curve=curve, seconds=elapsed,
                final_val_loss=curve[-1]["val_loss"], steps_run=curve[-1]["step"],
                describe=opt.describe() if name == "KFAC" else None)


def mean_curve(runs: list[dict]) -> list[dict]:
    """Seed-mean validation loss and seconds at each evaluated step (steps all runs reached)."""
    length = min(len(r["curve"]) for r in runs)
    return [dict(step=runs[0]["curve"][i]["step"],
                 seconds=statistics.fmean(r["curve"][i]["seconds"] for r in runs),
                 val_loss=statistics.fmean(r["curve"][i]["val_loss"] for r in runs)) for i in range(length)]


def time_to(curve: list[dict], target: float) -> tuple[int | None, float | None]:
    """First evaluated (step, seconds) at which ``curve`` reaches ``target``."""
    for point in curve:
        if point["val_loss"] <= target:
            return point["step"], point["seconds"]
    return None, None


def summarize(results: dict[str, list[dict]]) -> dict:
    """Per optimizer: final loss mean/std, seconds, and time to AdamW's final loss."""
    target = statistics.fmean(r["final_val_loss"] for r in results["AdamW"])
    out = {"target_val_loss": target}
    for name, runs in results.items():
        finals = [r["final_val_loss"] for r in runs]
        curve = mean_curve(runs)
        step, seconds = time_to(curve, target)
        out[name] = dict(final_val_loss=statistics.fmean(finals),
                         final_val_loss_std=statistics.pstdev(finals) if len(finals) > 1 else 0.0,
                         seconds=statistics.fmean(r["seconds"] for r in runs),
                         steps_to_target=step, seconds_to_target=seconds, curve=curve)
    adam, kfac = out["AdamW"]["seconds_to_target"], out["KFAC"]["seconds_to_target"]
    out["time_ratio_kfac_over_adamw"] = None if (adam is None or kfac is None) else kfac / adam
    out["goal_met"] = out["time_ratio_kfac_over_adamw"] is not None and out["time_ratio_kfac_over_adamw"] <= 0.7
    return out


def table(summary: dict, chosen: dict) -> str:
    """The printed results table."""
    width = max(len(json.dumps(c)) for c in chosen.values())
    lines = [f"target (AdamW mean final val loss): {summary['target_val_loss']:.4f}",
             f"{'optimizer':<9} {'setting':<{width}} {'final val (±std)':>17} {'seconds':>8} "
             f"{'steps→tgt':>9} {'s→tgt':>7}"]
    for name in ("AdamW", "KFAC"):
        s = summary[name]
        steps = "-" if s["steps_to_target"] is None else str(s["steps_to_target"])
        secs = "-" if s["seconds_to_target"] is None else f"{s['seconds_to_target']:.1f}"
        lines.append(f"{name:<9} {json.dumps(chosen[name]):<{width}} {s['final_val_loss']:>8.4f} ± "
                     f"{s['final_val_loss_std']:.4f} {s['seconds']:>8.1f} {steps:>9} {secs:>7}")
    ratio = summary["time_ratio_kfac_over_adamw"]
    lines.append(f"KFAC / AdamW time to target: {'-' if ratio is None else f'{ratio:.2f}'} "
                 f"(goal ≤ 0.70: {'met' if summary['goal_met'] else 'NOT met'})")
    return "\n".join(lines)


def plot(summary: dict, results: dict, path: str) -> None:
    """Validation loss against steps and against seconds (seed means, seeds faint)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, color in (("AdamW", "tab:blue"), ("KFAC", "tab:red")):
        for r in results[name]:
            for ax, key in zip(axes, ("step", "seconds")):
                ax.plot([p[key] for p in r["curve"]], [p["val_loss"] for p in r["curve"]], color=color, alpha=0.25)
        for ax, key in zip(axes, ("step", "seconds")):
            c = summary[name]["curve"]
            ax.plot([p[key] for p in c], [p["val_loss"] for p in c], color=color, label=name)
    for ax, label in zip(axes, ("steps", "seconds (timed steps)")):
        ax.axhline(summary["target_val_loss"], color="gray", ls="--", lw=0.8)
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (nats/char)")
        ax.legend()
    fig.suptitle("char-level GPT on Debian fortunes (2 threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test (40 steps, 1 seed, 1 setting)")
    parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help="where JSON and PNG go")
    parser.add_argument("--seeds", type=int, default=None, help="seeds (3; quick: 1)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (400; quick: 40)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    steps = args.steps or (40 if args.quick else 400)
    seeds = args.seeds or (1 if args.quick else 3)
    eval_every = 10 if args.quick else 25
    data = encode(load_text())
    split = int(0.9 * len(data))
    train, val = data[:split], batches(data[split:], 4 if args.quick else 16, seed=99)
    grids = {k: v[:1] if args.quick else v for k, v in GRIDS.items()}
    tuning: dict[str, list[dict]] = {k: [] for k in grids}
    for i in range(max(len(g) for g in grids.values())):  # stage 1: seed 0, alternating
        for name, grid in grids.items():
            if i < len(grid):
                r = run(name, grid[i], 0, steps, eval_every, train, val)
                tuning[name].append(r)
                print(f"tune {name} {grid[i]}: final val {r['final_val_loss']:.4f} in {r['seconds']:.1f}s", flush=True)
    chosen = {k: min(v, key=lambda r: r["final_val_loss"])["setting"] for k, v in tuning.items()}
    results = {k: [min(v, key=lambda r: r["final_val_loss"])] for k, v in tuning.items()}
    for seed in range(1, seeds):  # stage 2
        for name in grids:
            r = run(name, chosen[name], seed, steps, eval_every, train, val)
            results[name].append(r)
            print(f"seed {seed} {name}: final val {r['final_val_loss']:.4f} in {r['seconds']:.1f}s", flush=True)
    summary = summarize(results)
    print(table(summary, chosen))
    print(results["KFAC"][0]["describe"])
    os.makedirs(args.out_dir, exist_ok=True)
    name = "char_lm_quick" if args.quick else "char_lm"
    record = dict(benchmark="char_lm", quick=args.quick, steps=steps, seeds=seeds, batch=BATCH, context=CONTEXT,
                  width=WIDTH, heads=HEADS, layers=LAYERS, grids=GRIDS, adamw_settings=ADAMW_SETTINGS,
                  kfac_settings=KFAC_SETTINGS, chosen=chosen, summary=summary,
                  tuning={k: [dict(setting=r["setting"], final_val_loss=r["final_val_loss"], seconds=r["seconds"])
                              for r in v] for k, v in tuning.items()},
                  runs={k: [dict(seed=r["seed"], final_val_loss=r["final_val_loss"], seconds=r["seconds"],
                                 curve=r["curve"]) for r in v] for k, v in results.items()},
                  kfac_describe=results["KFAC"][0]["describe"], torch=torch.__version__,
                  python=platform.python_version(), threads=torch.get_num_threads())
    with open(os.path.join(args.out_dir, f"{name}.json"), "w") as f:
        json.dump(record, f, indent=1)
    plot(summary, results, os.path.join(args.out_dir, f"{name}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
