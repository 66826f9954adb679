"""The DreamBooth trainer on a tiny SD1.5-layout model: outputs, resume, learning, formulas."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import loha_diffusion  # noqa: F401
from loha_diffusion.training.buckets import BucketPlan
from loha_diffusion.training.data import DreamBoothDataset, collate
from loha_diffusion.training.images import in_memory_records
from loha_diffusion.training.loop import main
from loha_diffusion.training.loss import dreambooth_loss, min_snr_weights, snr, training_target
from tiny_models import tiny_sd15_pipeline

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    pipe = tiny_sd15_pipeline(root / "tok")
    pipe.save_pretrained(root / "model")
    (root / "inst").mkdir()
    yy, xx = np.mgrid[:24, :24]
    disc = ((yy - 12) ** 2 + (xx - 12) ** 2 < 60)[..., None] * np.array([200, 30, 160]) + 20
    Image.fromarray(disc.astype("uint8")).save(root / "inst" / "0.png")
    return root


def train_args(setup, out, *extra, steps=4):
    """Flags of a short run on the tiny model and the one instance image (later flags win)."""
    return ["--pretrained_model_name_or_path", str(setup / "model"), "--instance_data_dir", str(setup / "inst"),
            "--instance_prompt", PROMPT, "--resolution", "16", "--max_train_steps", str(steps),
            "--output_dir", str(out), "--report_to", "none", "--checkpointing_steps", "1000", *extra]


def run(setup, out, *extra, steps=4):
    assert main(train_args(setup, out, *extra, steps=steps)) == 0
    return out


def test_output_file_loads_and_changes_outputs(setup, tmp_path):
    out = run(setup, tmp_path / "out", "--train_text_encoder", "--learning_rate", "1e-3", "--validation_prompt",
              PROMPT, "--validation_prompt", "a photo", "--num_validation_images", "2",
              "--validation_inference_steps", "2", "--validation_steps", "2")
    path = out / "loha.safetensors"
    tensors = load_file(str(path))
    modules = {k.split(".", 1)[0] for k in tensors}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in modules
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in modules
    assert "lora_unet_down_blocks_0_downsamplers_0_conv" in modules
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in modules
    assert all(f"{m}.alpha" in tensors for m in modules)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_base_model_version"] == "sd_v1"
    assert json.loads(meta["ss_network_args"])["algo"] == "loha" and meta["ss_steps"] == "4"
    assert (out / "README.md").is_file() and (out / "loss.png").is_file()
    assert (out / "before_after.png").is_file() and (out / "validation" / "step-000002.png").is_file()
    assert "before_after.png" in (out / "README.md").read_text()

    pipe = tiny_sd15_pipeline(tmp_path / "tok")
    ids = pipe.tokenizer([PROMPT], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    sample, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    with torch.no_grad():
        base = pipe.unet(sample, t, pipe.text_encoder(ids)[0]).sample
        pipe.load_loha_weights(path)
        adapted = pipe.unet(sample, t, pipe.text_encoder(ids)[0]).sample
    assert (adapted - base).abs().max() > 1e-4


def test_text_encoder_adapters_only_with_the_flag(setup, tmp_path):
    out = run(setup, tmp_path / "out", "--algo", "lora", "--preset", "attn-only", steps=2)
    names = {k.split(".", 1)[0] for k in load_file(str(out / "loha.safetensors"))}
    assert names and not any(n.startswith("lora_te") for n in names)
    assert all(n.endswith(("to_q", "to_k", "to_v", "to_out_0")) for n in names)


@pytest.fixture
def one_thread():
    """Bit-equality across two runs needs a fixed reduction order: with several threads, a busy
    machine can change how the CPU kernels split their sums."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_resume_gives_the_same_tensors_as_an_uninterrupted_run(setup, tmp_path, one_thread):
    flags = ["--train_text_encoder", "--checkpointing_steps", "2", "--rank_dropout", "0.2", "--random_flip",
             "--learning_rate", "1e-3", "--lr_scheduler", "cosine"]
    full = run(setup, tmp_path / "full", *flags)
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    os.rename(full / "checkpoint-2", resumed_dir / "checkpoint-2")
    run(setup, resumed_dir, *flags, "--resume_from_checkpoint", "latest")
    a, b = load_file(str(full / "loha.safetensors")), load_file(str(resumed_dir / "loha.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def denoising_loss(pipe, steps=12):
    """Mean epsilon MSE of the UNet on the instance image over fixed (noise, t) pairs."""
    image = np.asarray(Image.open(Path(pipe._instance)).convert("RGB").resize((16, 16)), dtype=np.float32) / 127.5 - 1
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None]
    g = torch.Generator().manual_seed(0)
    ids = pipe.tokenizer([PROMPT], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        hidden = pipe.text_encoder(ids)[0]
        total = 0.0
        for i in range(steps):
            t = torch.tensor([50 + 75 * i])
            noise = torch.randn(latents.shape, generator=g)
            pred = pipe.unet(pipe.scheduler.add_noise(latents, noise, t), t, hidden).sample
            total += torch.nn.functional.mse_loss(pred, noise).item()
    return total / steps


def test_overfitting_one_image_lowers_the_loss(setup, tmp_path):
    out = run(setup, tmp_path / "out", "--learning_rate", "2e-3", "--train_text_encoder", steps=30)
    pipe = tiny_sd15_pipeline(tmp_path / "tok")
    pipe._instance = setup / "inst" / "0.png"
    before = denoising_loss(pipe)
    pipe.load_loha_weights(out / "loha.safetensors")
    after = denoising_loss(pipe)
    assert after < 0.8 * before, (before, after)


def test_bad_data_fails_before_loading_a_model(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["--pretrained_model_name_or_path", "/does/not/matter", "--instance_data_dir",
                 str(tmp_path / "empty"), "--instance_prompt", "x"]) == 2
    assert "holds no images" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"not an image")
    assert main(["--pretrained_model_name_or_path", "/does/not/matter", "--instance_data_dir",
                 str(tmp_path / "bad"), "--instance_prompt", "x"]) == 2
    assert "no usable instance images" in capsys.readouterr().err


# -- the objective against its formulas ---------------------------------------------------------
def test_min_snr_weights_and_v_target_follow_the_formulas():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="v_prediction")
    t = torch.tensor([1, 100, 500, 999])
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)[t]
    expected_snr = abar / (1 - abar)
    torch.testing.assert_close(snr(scheduler.alphas_cumprod, t).double(), expected_snr, rtol=1e-4, atol=0)
    s = expected_snr.float()
    torch.testing.assert_close(min_snr_weights(s, 5.0, "epsilon"), torch.clamp(s, max=5.0) / s)
    torch.testing.assert_close(min_snr_weights(s, 5.0, "v_prediction"), torch.clamp(s, max=5.0) / (s + 1))
    latents, noise = torch.randn(4, 4, 2, 2), torch.randn(4, 4, 2, 2)
    v = training_target(scheduler, latents, noise, t)
    expected_v = abar.sqrt().float().view(-1, 1, 1, 1) * noise - (1 - abar).sqrt().float().view(-1, 1, 1, 1) * latents
    torch.testing.assert_close(v, expected_v, rtol=1e-4, atol=1e-5)


def test_prior_preservation_batches_hold_instance_then_class_halves():
    img = Image.new("RGB", (20, 20), (255, 0, 0))
    cls = Image.new("RGB", (20, 20), (0, 0, 255))
    dataset = DreamBoothDataset(in_memory_records([(img, "sks")]), in_memory_records([(cls, "dog"), (cls, "dog 2")]),
                                BucketPlan(16), center_crop=True, random_flip=False)
    assert len(dataset) == 2
    batch = collate([dataset[0], dataset[1]])
    assert batch["captions"] == ["sks", "sks", "dog", "dog 2"] and batch["with_prior"]
    assert (batch["pixels"][:2, 0] > 0.9).all() and (batch["pixels"][2:, 2] > 0.9).all()
    pred, target = torch.zeros(4, 1), torch.tensor([[1.0], [1.0], [2.0], [2.0]])
    loss, instance, prior = dreambooth_loss(pred, target, None, True, prior_loss_weight=0.5)
    assert instance.item() == 1.0 and prior.item() == 4.0 and loss.item() == 3.0


def test_two_processes_write_one_file(setup, tmp_path):
    out = tmp_path / "ddp"
    env = subprocess_env(OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               str(REPO / "train_scripts" / "train_loha_sd.py"),
               *train_args(setup, out, "--repeats", "2", "--checkpointing_steps", "1", "--train_text_encoder", steps=2)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["loha.safetensors"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert result.stdout.count("Saved the adapter") == 1


def subprocess_env(**extra):
    """The script imports loha_diffusion from this checkout, not from wherever it is installed."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


def cli_command(setup, out, *extra, steps=3):
    return [sys.executable, str(REPO / "train_scripts" / "train_loha_sd.py"),
            *train_args(setup, out, *extra, steps=steps)]


def test_bf16_mixed_precision_keeps_adapters_fp32_and_learns(setup, tmp_path):
    # its own process: accelerate fixes the precision once per process
    out = tmp_path / "bf16"
    result = subprocess.run(cli_command(setup, out, "--mixed_precision", "bf16", "--train_text_encoder",
                                        "--learning_rate", "2e-3", "--save_precision", "fp32", steps=20),
                            capture_output=True, text=True, env=subprocess_env(OMP_NUM_THREADS="2"), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    tensors = load_file(str(out / "loha.safetensors"))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())
    pipe = tiny_sd15_pipeline(tmp_path / "tok")
    pipe._instance = setup / "inst" / "0.png"
    before = denoising_loss(pipe)
    pipe.load_loha_weights(out / "loha.safetensors")
    assert denoising_loss(pipe) < 0.9 * before


def test_gradient_checkpointing_changes_memory_not_results(setup, tmp_path, one_thread):
    flags = ["--train_text_encoder", "--learning_rate", "1e-3", "--rank_dropout", "0.2"]
    plain = load_file(str(run(setup, tmp_path / "plain", *flags, steps=3) / "loha.safetensors"))
    ckpt = load_file(str(run(setup, tmp_path / "ckpt", *flags, "--gradient_checkpointing", steps=3)
                         / "loha.safetensors"))
    assert plain.keys() == ckpt.keys()
    for key in plain:
        torch.testing.assert_close(ckpt[key], plain[key], rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_counts_optimizer_steps(setup, tmp_path):
    out = run(setup, tmp_path / "acc", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "2",
              "--repeats", "4", "--lr_scheduler", "linear", "--learning_rate", "1e-3", steps=3)
    state = json.loads((out / "checkpoint-2" / "state.json").read_text())
    assert (state["global_step"], state["micro_step"]) == (2, 4)   # two micro-batches per optimizer step
    history = json.loads((out / "loss_history.json").read_text())
    lrs = [h["lr"] for h in history]
    assert len(lrs) == 3 and lrs[0] > lrs[1] > lrs[2]              # the scheduler moves once per optimizer step


@pytest.mark.parametrize("lr,what", [("1e37", "loss"), ("1e38", "adapter weights")])
def test_divergence_stops_and_keeps_only_good_checkpoints(setup, tmp_path, caplog, lr, what):
    # lr 1e37: the first update makes the weights ~1e38 (finite; the next loss is not); lr 1e38:
    # Adam's first step size lr / (1 - beta1) overflows the weights at once, after a finite loss
    out = tmp_path / "nan"
    args = train_args(setup, out, "--checkpointing_steps", "1", "--learning_rate", lr, "--max_grad_norm", "0", steps=6)
    assert main(args) == 3
    assert f"the {what} became NaN/inf" in caplog.text
    assert not (out / "loha.safetensors").exists()
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == (["checkpoint-1"] if what == "loss" else [])
    assert all(torch.isfinite(t).all() for c in checkpoints
               for t in load_file(str(c / "adapters.safetensors")).values())


def test_sigterm_saves_a_checkpoint_then_exits(setup, tmp_path):
    import signal
    import threading
    import time

    out = tmp_path / "term"
    proc = subprocess.Popen(cli_command(setup, out, "--checkpointing_steps", "100000", steps=100000),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env(OMP_NUM_THREADS="1"))
    seen = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: proc.stderr.read(64), b"")), daemon=True)
    reader.start()
    deadline = time.time() + 600
    while b"steps:" not in b"".join(seen) or b"it/s" not in b"".join(seen):  # training has begun
        assert proc.poll() is None and time.time() < deadline, b"".join(seen)[-2000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM
    reader.join(timeout=10)
    checkpoints = list(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "adapters.safetensors").is_file()
    assert "resume with --resume_from_checkpoint latest" in b"".join(seen).decode(errors="replace")


@pytest.mark.parametrize("kind,stage", [("FSDP", None), ("DEEPSPEED", 3), ("DEEPSPEED", 2), ("MULTI_GPU", None)])
def test_parameter_sharding_is_refused_with_a_clear_message(kind, stage):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from loha_diffusion.training.args import UsageError
    from loha_diffusion.training.loop import refuse_parameter_sharding

    accelerator = SimpleNamespace(distributed_type=getattr(DistributedType, kind), state=SimpleNamespace(
        deepspeed_plugin=None if stage is None else SimpleNamespace(zero_stage=stage)))
    if kind == "FSDP" or stage == 3:
        with pytest.raises(UsageError, match="--multi_gpu"):
            refuse_parameter_sharding(accelerator)
    else:
        refuse_parameter_sharding(accelerator)  # DDP and ZeRO-1/2 keep whole parameters


def test_command_line_flags_win_over_the_demo_settings(monkeypatch, tmp_path):
    from loha_diffusion.training.args import parse_args

    monkeypatch.setattr(sys, "argv", ["train_loha_sd.py", "--output_dir", str(tmp_path / "mine"),
                                      "--max_train_steps=7", "--demo_assets", str(REPO / "assets")])
    args = parse_args()  # as the script calls it: argv from sys.argv
    assert args.demo and args.instance_prompt == "a sks shape"          # the demo otherwise
    assert args.pretrained_model_name_or_path == str(REPO / "assets" / "demo-model")
    assert (args.output_dir, args.max_train_steps) == (str(tmp_path / "mine"), 7)
