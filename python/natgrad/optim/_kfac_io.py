"""natgrad.KFAC's introspection and checkpoints: ``describe()``, and the ``"kfac"`` entry of its
state_dict (validated completely before anything is loaded)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from natgrad.optim.kfac import KFAC

STATE_KEY = "kfac"  # the optimizer-level entry in state_dict()


def describe(opt: KFAC) -> str:
    """A table of every optimized parameter and the preconditioner it gets."""
    rows = []
    for group in opt.param_groups:
        for p in group["params"]:
            block = opt._block_of.get(id(p))
            untraced = getattr(opt._captures.get(getattr(block, "name", None)), "reason", None)
            if untraced is not None:
                how = f"plain gradient: {untraced}"
            elif block is not None and (opt._captures[block.name].fired or block.has_factors):
                how = block.description
            elif block is not None:
                how = "plain gradient until its hooks fire (none so far: is the layer used functionally?)"
            else:
                how = opt._plain_block(p).description
            rows.append((opt._param_names.get(id(p), "<unnamed>"), "x".join(map(str, p.shape)) or "scalar", how))
    width = [max(len(r[i]) for r in rows + [("parameter", "shape", "")]) for i in range(2)]
    lines = [f"{'parameter':<{width[0]}}  {'shape':<{width[1]}}  preconditioner"]
    lines += [f"{n:<{width[0]}}  {s:<{width[1]}}  {h}" for n, s, h in rows]
    return "\n".join(lines)


def kfac_state(opt: KFAC) -> dict[str, Any]:
    """The ``"kfac"`` entry: counters, damping multiplier, faults, sampler state, blocks."""
    return {
        "steps": opt._steps,
        "refreshes": opt._refreshes,
        "damping_multiplier": opt._damping_multiplier,
        "faults": dict(opt._faults),
        "ladder": dict(opt._ladder),
        "decomposed": sorted(opt._decomposed),
        "generator": opt._generator.get_state(),
        "blocks": {b.name: b.state_dict() for b in opt._blocks},
    }


def check_state(opt: KFAC, state_dict: dict[str, Any], kfac: dict[str, Any]) -> None:
    """Raises ValueError (naming the layer or parameter and both shapes) unless the checkpoint
    fits this optimizer; changes nothing."""
    missing = [k for k in ("steps", "damping_multiplier", "faults", "ladder", "generator", "blocks")
               if k not in kfac]
    if missing:
        raise ValueError(f"state_dict[{STATE_KEY!r}] lacks {missing}: not saved by natgrad.KFAC")
    mine = {b.name: b for b in opt._blocks}
    foreign = sorted(set(kfac["blocks"]) - set(mine))
    if foreign:
        raise ValueError(f"state_dict has curvature for layers this model lacks: {foreign}")
    for name, state in kfac["blocks"].items():
        mine[name].check_state_dict(state)
    saved_groups = state_dict.get("param_groups", [])
    if len(saved_groups) != len(opt.param_groups):
        return  # torch.optim's own load_state_dict raises its clear error
    for saved, group in zip(saved_groups, opt.param_groups):
        for index, p in zip(saved["params"], group["params"]):
            for key, value in state_dict.get("state", {}).get(index, {}).items():
                if isinstance(value, Tensor) and value.dim() > 0 and value.shape != p.shape:
                    name = opt._param_names.get(id(p), f"parameter {index}")
                    raise ValueError(f"state_dict: {key} of {name!r} has shape {tuple(value.shape)}, "
                                     f"the parameter has {tuple(p.shape)} (was the model's width changed?)")


def load_kfac_state(opt: KFAC, kfac: dict[str, Any]) -> None:
    """Restores :func:`kfac_state` output (already checked by :func:`check_state`)."""
    opt._steps = int(kfac["steps"])
    opt._refreshes = int(kfac.get("refreshes", 0))
    opt._damping_multiplier = float(kfac["damping_multiplier"])
    opt._faults, opt._ladder = dict(kfac["faults"]), dict(kfac["ladder"])
    opt._generator.set_state(kfac["generator"])
    opt._decomposed = set(kfac.get("decomposed", ()))
    for block in opt._blocks:
        block.state = {}
        if block.name in kfac["blocks"]:
            block.load_state_dict(kfac["blocks"][block.name])
    if opt._decomposed:
        opt._comm.assign([b for b in opt._blocks if b.has_factors])
