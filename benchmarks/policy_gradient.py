"""Natural policy gradient vs vanilla policy gradient (Adam) on gymnasium's CartPole-v1.

Both methods train the same categorical policy (MLP 4-32-32-2, tanh) from the same batches:
``envs`` CartPole environments stepped together for ``horizon`` steps per iteration, advantages
the discounted reward-to-go (γ = 0.99, no bootstrap at a batch's end) standardized per batch, and
the surrogate ``L(θ) = mean_t log π_θ(a_t|s_t) Â_t``.

* **PG + Adam**: one Adam step on ``−L`` per batch (REINFORCE with a standardized return).
* **NPG** (Kakade 2002; the natural-gradient step of TRPO, Schulman et al. 2015, without the
  line search): ``x ≈ (F + λI)⁻¹ ∇L`` by ``natgrad.solvers.conjugate_gradient`` (10 iterations,
  λ = 0.1, TRPO's defaults) on matrix-free products with the exact Fisher of the policy over the
  batch's states (``compute_fisher(..., fisher_type="exact", structure="implicit")``, i.e. the
  Hessian of the mean KL), then ``θ ← θ + sqrt(2δ / xᵀFx) x`` so that the quadratic KL of the
  step is δ.

Tuning budget: the same for both — each of 4 values of its one step-size hyperparameter (Adam's
lr, NPG's δ) is run on one tuning seed; the value reaching the target soonest (else the highest
final average return) is then run on 3 fresh seeds. The target is CartPole-v1's threshold: an
average return of 475 over the last 20 finished episodes. Reported: environment steps and
wall-clock seconds to the target per seed, a table, JSON (benchmarks/results/policy_gradient.json)
and a PNG of the average return against environment steps and wall-clock.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from natgrad.fisher import compute_fisher  # noqa: E402
from natgrad.solvers import conjugate_gradient  # noqa: E402

DEFAULT_OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TARGET, WINDOW, GAMMA = 475.0, 20, 0.99
GRIDS = {"PG+Adam": ("lr", (1e-3, 3e-3, 1e-2, 3e-2)), "NPG": ("delta", (0.005, 0.01, 0.02, 0.05))}
CG_ITERS, CG_DAMPING = 10, 0.1


def make_policy(seed: int) -> nn.Module:
    """The categorical policy (logits over CartPole's two actions)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 2))


class Sampler:
    """``envs`` CartPole-v1 environments stepped together; finished episodes reset at once."""

    def __init__(self, envs: int, seed: int) -> None:
        import gymnasium as gym

        self.envs = [gym.make("CartPole-v1") for _ in range(envs)]
        self.obs = np.stack([e.reset(seed=seed * 1000 + i)[0] for i, e in enumerate(self.envs)])
        self.running = np.zeros(envs)
        self.returns: list[float] = []
        self.generator = torch.Generator().manual_seed(seed)

    def batch(self, policy: nn.Module, horizon: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``horizon`` steps of every environment: states, actions, standardized advantages."""
        n = len(self.envs)
        states = np.zeros((horizon, n, 4), dtype=np.float32)
        actions = np.zeros((horizon, n), dtype=np.int64)
        rewards = np.zeros((horizon, n))
        done = np.zeros((horizon, n), dtype=bool)
        for t in range(horizon):
            states[t] = self.obs
            with torch.no_grad():
                probs = torch.softmax(policy(torch.from_numpy(self.obs.astype(np.float32))), -1)
            actions[t] = torch.multinomial(probs, 1, generator=self.generator)[:, 0].numpy()
            for i, env in enumerate(self.envs):
                obs, reward, terminated, truncated, _ = env.step(int(actions[t, i]))
                rewards[t, i] = reward
                self.running[i] += reward
                if terminated or truncated:
                    done[t, i] = True
                    self.returns.append(float(self.running[i]))
                    self.running[i] = 0.0
                    obs, _ = env.reset()
                self.obs[i] = obs
        to_go = np.zeros((horizon, n))
        acc = np.zeros(n)
        for t in reversed(range(horizon)):
            acc = rewards[t] + GAMMA * acc * (~done[t])
            to_go[t] = acc
        adv = (to_go - to_go.mean()) / (to_go.std() + 1e-8)
        return (torch.from_numpy(states.reshape(-1, 4)), torch.from_numpy(actions.reshape(-1)),
                torch.from_numpy(adv.reshape(-1)).float())

    def average_return(self) -> float | None:
        """Mean return of the last ``WINDOW`` finished episodes (None before any)."""
        return float(np.mean(self.returns[-WINDOW:])) if self.returns else None


def surrogate(policy: nn.Module, states, actions, adv) -> torch.Tensor:
    """``mean_t log π(a_t|s_t) Â_t``."""
    logp = torch.log_softmax(policy(states), -1).gather(1, actions[:, None])[:, 0]
    return (logp * adv).mean()


def npg_step(policy: nn.Module, states, actions, adv, delta: float, damping: float = CG_DAMPING) -> int:
    """One natural policy-gradient step with the KL step size; returns CG's iteration count."""
    params = list(policy.parameters())
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(surrogate(policy, states, actions, adv), params)])
    fisher = compute_fisher(policy, states, fisher_type="exact", structure="implicit", chunk_size=len(states))
    result = conjugate_gradient(fisher, g, damping=damping, tol=1e-10, max_iters=CG_ITERS)
    x = result.solution
    curvature = float(fisher.quad_form(x))
    scale = (2 * delta / curvature) ** 0.5 if curvature > 0 else 0.0
    with torch.no_grad():
        offset = 0
        for p in params:
            p.add_(x[offset:offset + p.numel()].view_as(p), alpha=scale)
            offset += p.numel()
    return result.iterations


def train(method: str, value: float, seed: int, max_steps: int, envs: int, horizon: int,
          damping: float = CG_DAMPING) -> dict[str, Any]:
    """One run; returns the curve (env steps, seconds, average return) and steps/seconds to target."""
    policy = make_policy(seed)
    sampler = Sampler(envs, seed)
    adam = torch.optim.Adam(policy.parameters(), lr=value) if method == "PG+Adam" else None
    steps, seconds, curve = 0, 0.0, []
    hit_steps = hit_seconds = None
    while steps < max_steps:
        start = time.perf_counter()
        states, actions, adv = sampler.batch(policy, horizon)
        if adam is not None:
            adam.zero_grad()
            (-surrogate(policy, states, actions, adv)).backward()
            adam.step()
        else:
            npg_step(policy, states, actions, adv, value, damping)
        seconds += time.perf_counter() - start
        steps += len(states)
        avg = sampler.average_return()
        curve.append((steps, seconds, avg))
        if hit_steps is None and avg is not None and avg >= TARGET and len(sampler.returns) >= WINDOW:
            hit_steps, hit_seconds = steps, seconds
            break
    return {"curve": curve, "steps_to_target": hit_steps, "seconds_to_target": hit_seconds,
            "final_average_return": curve[-1][2], "episodes": len(sampler.returns)}


def rank_key(run: dict[str, Any]) -> tuple:
    """Sooner to the target is better; else a higher final average return."""
    if run["steps_to_target"] is not None:
        return (0, run["steps_to_target"])
    return (1, -(run["final_average_return"] or 0.0))


def plot(results: dict[str, Any], path: str) -> None:
    """Average return against environment steps and wall-clock, every seed of each method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (method, res), color in zip(results.items(), ("tab:blue", "tab:red")):
        for k, run in enumerate(res["runs"]):
            pts = [(s, t, r) for s, t, r in run["curve"] if r is not None]
            label = f"{method} ({res['hyper']}={res['value']:g})" if k == 0 else None
            axes[0].plot([p[0] for p in pts], [p[2] for p in pts], color=color, alpha=0.8, label=label)
            axes[1].plot([p[1] for p in pts], [p[2] for p in pts], color=color, alpha=0.8, label=label)
    for ax, xlabel in zip(axes, ("environment steps", "wall-clock (s)")):
        ax.axhline(TARGET, color="gray", ls="--", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"average return (last {WINDOW} episodes)")
        ax.legend()
    fig.suptitle("CartPole-v1: natural policy gradient (CG on Fisher-vector products) vs PG + Adam")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Tunes, runs, prints the table and writes the JSON and PNG."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test configuration")
    parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help="where the JSON and PNG go")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--max-steps", type=int, default=300_000, help="environment steps per run")
    parser.add_argument("--cg-damping", type=float, default=CG_DAMPING, help="λ of NPG's CG solve (TRPO: 0.1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    envs, horizon = (4, 64) if args.quick else (8, 256)
    max_steps = 512 if args.quick else args.max_steps
    seeds = [0] if args.quick else [0, 1, 2]
    tuning_seed = 100
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for method, (hyper, grid) in GRIDS.items():
        grid = grid[1:2] if args.quick else grid
        tuning = {v: train(method, v, tuning_seed, max_steps, envs, horizon, args.cg_damping) for v in grid}
        best = min(grid, key=lambda v: rank_key(tuning[v]))
        runs = [train(method, best, s, max_steps, envs, horizon, args.cg_damping) for s in seeds]
        results[method] = {"hyper": hyper, "value": best, "runs": runs,
                           "tuning": {str(v): {k: r[k] for k in ("steps_to_target", "seconds_to_target",
                                                                  "final_average_return")}
                                      for v, r in tuning.items()}}
        print(f"{method}: tuned {hyper} over {list(grid)} on seed {tuning_seed} -> {best:g}", flush=True)
    print(f"\nCartPole-v1, target: average return {TARGET:g} over the last {WINDOW} episodes; "
          f"{envs}x{horizon} steps per iteration; seeds {seeds}")
    print(f"{'method':<10} {'hyper':<12} {'seed':>4} {'steps to target':>16} {'s to target':>12} {'final avg':>10}")
    for method, res in results.items():
        for s, run in zip(seeds, res["runs"]):
            st = run["steps_to_target"]
            sec = run["seconds_to_target"]
            print(f"{method:<10} {res['hyper'] + '=' + format(res['value'], 'g'):<12} {s:>4} "
                  f"{'-' if st is None else st:>16} {'-' if sec is None else f'{sec:.1f}':>12} "
                  f"{run['final_average_return'] or 0:>10.1f}")
    means: dict[str, float | None] = {}
    for method, res in results.items():
        steps = [r["steps_to_target"] for r in res["runs"]]
        means[method] = None if None in steps else float(np.mean(steps))
    npg, pg = means["NPG"], means["PG+Adam"]
    met = npg is not None and (pg is None or npg < pg)
    print(f"\nGoal: NPG reaches {TARGET:g} in fewer environment steps than PG+Adam (mean over seeds; "
          f"'never' if a seed does not reach it within {max_steps} steps): NPG {npg or 'never'} vs "
          f"PG+Adam {pg or 'never'} -> {'met' if met else 'NOT met'}")
    os.makedirs(args.out_dir, exist_ok=True)
    payload = {"quick": args.quick, "wall_s": time.perf_counter() - started, "threads": args.threads,
               "target": TARGET, "window": WINDOW, "envs": envs, "horizon": horizon, "max_steps": max_steps,
               "seeds": seeds, "tuning_seed": tuning_seed, "cg": {"iters": CG_ITERS, "damping": args.cg_damping},
               "grids": {m: list(g) for m, (_, g) in GRIDS.items()}, "results": results,
               "mean_steps_to_target": means, "goal_met": met}
    with open(os.path.join(args.out_dir, "policy_gradient.json"), "w") as f:
        json.dump(payload, f, indent=1)
    plot(results, os.path.join(args.out_dir, "policy_gradient.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
