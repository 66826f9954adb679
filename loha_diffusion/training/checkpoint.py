"""Training checkpoints: adapter tensors, optimizer, LR scheduler and counters, written atomically.

Only the adapters are saved (the frozen base model never changes), so a checkpoint is small.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX = "checkpoint-"


def trainable_state(models: dict) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": p.detach().cpu().contiguous()
            for name, model in models.items() for key, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(output_dir, step: int, models: dict, optimizer, lr_scheduler, counters: dict,
                    total_limit: int | None = None) -> Path:
    """Write ``checkpoint-<step>`` (temp folder + rename), removing the oldest beyond the limit."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if total_limit is not None:
        existing = list_checkpoints(output_dir)
        for old in existing[: max(0, len(existing) - total_limit + 1)]:
            shutil.rmtree(old)
    final = output_dir / f"{PREFIX}{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{PREFIX}{step}.", dir=output_dir))
    try:
        save_file(trainable_state(models), str(tmp / "adapters.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(counters))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def list_checkpoints(output_dir) -> list[Path]:
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and p.name[len(PREFIX):].isdigit() and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def resolve_checkpoint(output_dir, requested: str | None) -> Path | None:
    if requested is None:
        return None
    if requested == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    return Path(requested)


def load_checkpoint(path, models: dict, optimizer, lr_scheduler) -> dict:
    """Restore everything saved by ``save_checkpoint``; return its counters."""
    path = Path(path)
    state = load_file(str(path / "adapters.safetensors"))
    expected = trainable_state(models)
    if state.keys() != expected.keys():
        missing, extra = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
        raise ValueError(f"{path} was made with other adapter settings: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}; resume with the flags of the original run")
    with torch.no_grad():
        for name, model in models.items():
            for key, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(state[f"{name}.{key}"])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    return json.loads((path / "state.json").read_text())
