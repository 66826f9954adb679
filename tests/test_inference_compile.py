"""torch.compile (CPU inductor) over adapter layers: the same outputs as eager, and strength,
active-set and fuse changes made after compiling take effect (by a recompile, never a stale graph).

To keep CPU compile time to seconds, the compiled module is one transformer block of the tiny
SD1.5 UNet (attention, feed-forward and projections adapted); the eager reference is the same
module object run uncompiled, so both see every change.
"""
import torch

import loha_diffusion  # noqa: F401  (attaches the pipeline methods)
from adapter_files import make_file_tensors
from tiny_models import tiny_sd15_pipeline


def test_compiled_block_follows_strength_active_set_and_fuse_changes(tmp_path):
    pipe = tiny_sd15_pipeline(tmp_path)
    state, _ = make_file_tensors(pipe, "loha")
    pipe.load_loha_weights(state, adapter_name="a")
    block = pipe.unet.down_blocks[1].attentions[0]
    compiled = torch.compile(block, backend="inductor")
    generator = torch.Generator().manual_seed(0)
    hidden, context = torch.randn(2, 32, 4, 4, generator=generator), torch.randn(2, 8, 32, generator=generator)

    def outputs():
        with torch.no_grad():
            eager = block(hidden, encoder_hidden_states=context).sample
            return eager, compiled(hidden, encoder_hidden_states=context).sample

    seen = []
    for change in (lambda: None,
                   lambda: pipe.set_loha_adapters("a", 0.5),
                   lambda: pipe.fuse_loha(),
                   lambda: (pipe.unfuse_loha(), pipe.set_loha_adapters([]))):
        change()
        eager, from_compiled = outputs()
        torch.testing.assert_close(from_compiled, eager, rtol=1e-4, atol=1e-5)
        seen.append(eager)
    # each change really changed the output (fusing at 0.5 keeps it): a stale graph would fail above
    assert (seen[0] - seen[1]).abs().max() > 1e-3 and (seen[1] - seen[3]).abs().max() > 1e-3
    torch.testing.assert_close(seen[2], seen[1], rtol=1e-4, atol=1e-5)
