"""Helpers shared by the bench scripts: thread setup, SD1.5-shaped model builders, RSS probes.

Everything is built from configs with seeded random weights (no hub access). The shapes
follow SD1.5 (block types, cross-attention width 768, CLIP-L text width) at reduced depth /
channel counts so that a CPU training step stays short.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import resource
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # the package is used from the checkout, not installed
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

# Module names (dotted suffixes of module paths) that receive an adapter.
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
                "conv1", "conv2", "conv_shortcut", "time_emb_proj"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]

_THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def configure_threads(default: int = 2) -> int:
    """``torch.set_num_threads(default)`` unless OMP_NUM_THREADS / MKL_NUM_THREADS is set."""
    if not any(os.environ.get(v) for v in _THREAD_ENV_VARS):
        torch.set_num_threads(default)
    return torch.get_num_threads()


@contextlib.contextmanager
def seeded(seed: int):
    """Seed torch inside the block without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_sd15_unet(seed: int = 0, **overrides):
    """SD1.5 block layout with block_out_channels (64, 128, 256, 256), 32x32 latents."""
    from diffusers import UNet2DConditionModel

    config = dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128, 256, 256),
        layers_per_block=2,
        norm_num_groups=32,
        cross_attention_dim=768,
        attention_head_dim=8,  # diffusers' legacy name: number of heads, as in SD1.5
        use_linear_projection=False,  # SD1.5: proj_in / proj_out are 1x1 convs
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
    )
    config.update(overrides)
    with seeded(seed):
        return UNet2DConditionModel(**config)


def build_clip_l_text_encoder(seed: int = 0, num_hidden_layers: int = 4, **overrides):
    """CLIP-L-width text encoder (hidden 768, 12 heads, MLP 3072, 77 positions, vocab 49408)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    config.update(overrides)
    with seeded(seed):
        return CLIPTextModel(CLIPTextConfig(**config))


def clip_token_ids(batch: int = 2, length: int = 77, seed: int = 0) -> torch.Tensor:
    """Fixed prompt-like ids: BOS, some random tokens, EOS, EOS padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, length), 49407, dtype=torch.long)
    ids[:, 0] = 49406
    for row in range(batch):
        n = int(torch.randint(8, length - 2, (1,), generator=gen))
        ids[row, 1:1 + n] = torch.randint(0, 49406, (n,), generator=gen)
    return ids


# -- CPU contention probe (Linux) -----------------------------------------------------------------
class OtherLoad:
    """CPU time other processes used during a block, in cores (busy time of the machine minus ours).

    A timed step shares the machine's cores; when another process is busy, a step with 2
    OpenMP threads can be slowed far more than its share (every parallel region waits for a
    descheduled thread), so each timing is reported with this figure.
    """

    _tick = os.sysconf("SC_CLK_TCK")

    @classmethod
    def _busy_seconds(cls) -> float:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
        return busy / cls._tick

    def __enter__(self):
        self._t, self._busy, self._own = time.perf_counter(), self._busy_seconds(), _own_cpu()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self._t
        others = (self._busy_seconds() - self._busy) - (_own_cpu() - self._own)
        self.cores = max(0.0, others) / wall if wall > 0 else 0.0
        return False


def wait_for_idle(threshold: float = 0.15, window: float = 0.5, timeout: float = 60.0) -> tuple[bool, float]:
    """Sleep until other processes use under ``threshold`` cores over ``window`` seconds.

    Returns (idle reached, seconds waited); gives up after ``timeout``.
    """
    start = time.perf_counter()
    while True:
        with OtherLoad() as load:
            time.sleep(window)
        waited = time.perf_counter() - start
        if load.cores < threshold:
            return True, waited
        if waited >= timeout:
            return False, waited


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


# -- memory probes (Linux) -------------------------------------------------------------------
def current_rss_mib() -> float:
    """Resident set size of this process now, in MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def max_rss_mib() -> float:
    """Peak RSS of this process (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, KiB on Linux).

    Caveat: Linux reports max(signal->maxrss, mm high-water mark), and signal->maxrss keeps the
    RSS of the process image replaced by exec - for a child of a big process, the parent's RSS
    at spawn time. ``status_mib("VmHWM")`` is the mm high-water mark alone.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def status_mib(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmHWM``, ``VmRSS``, ...) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def release_freed_memory() -> None:
    """Collect garbage and hand freed malloc arenas back to the OS, so RSS is what is live."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (``echo 5 > /proc/self/clear_refs``).

    ``ru_maxrss`` reads that mark, so after a reset it measures the peak from here on and not
    a transient peak of model construction. Returns False where the kernel refuses.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
