"""Process-level pieces of a run: stop on a signal, refuse parameter sharding, the optimizer."""
from __future__ import annotations

import functools
import logging
import signal

import torch

from .args import UsageError

logger = logging.getLogger("loha_diffusion.train")


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint after the current step and exits."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signal = signum
        logger.warning("received %s: saving a checkpoint after this step, then stopping",
                       signal.Signals(signum).name)


def refuse_parameter_sharding(accelerator) -> None:
    """FSDP and DeepSpeed ZeRO-3 split every parameter across processes. The adapter tensors
    are a few MB and the frozen model is only read, so sharding saves little here, and the
    checkpoints, validation images and the final file are all made from whole parameters on the
    main process. Multi-GPU DDP and ZeRO stages 1-2 (optimizer state sharded, parameters whole)
    keep all of that working."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if kind == DistributedType.FSDP or (kind == DistributedType.DEEPSPEED and plugin is not None
                                       and plugin.zero_stage == 3):
        raise UsageError(f"{'FSDP' if kind == DistributedType.FSDP else 'DeepSpeed ZeRO-3'} shards the parameters, "
                         "which this trainer does not support; launch with --multi_gpu (DDP) or a DeepSpeed config "
                         "with zero_stage 1 or 2 instead")


def make_optimizer(args, groups):
    # One fused kernel for all adapter tensors: a LoHa has four per layer, and the per-tensor
    # loop of the default AdamW costs several times the fused update on CPU as on GPU.
    optimizer_class = functools.partial(torch.optim.AdamW, fused=True)
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UsageError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        optimizer_class = bnb.optim.AdamW8bit
    return optimizer_class(groups, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                           eps=args.adam_epsilon)
