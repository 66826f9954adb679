"""The embedded demo model (assets/demo-model) and its data/scoring helpers (assets/demo_data.py).

The scorer is checked against rendered ground truth (images whose colour and shape are
known by construction), never against the model it later judges.
"""
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ASSETS = Path(__file__).resolve().parent.parent / "assets"
sys.path.insert(0, str(ASSETS))

import demo_data  # noqa: E402

MODEL_DIR = ASSETS / "demo-model"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These models are tiny; with two busy-waiting threads on a shared two-core machine a
    # 2 s test was measured at 80 s, with one thread it stays at a few seconds.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    assert (MODEL_DIR / "model_index.json").is_file(), (
        f"{MODEL_DIR} is missing: rebuild it with `python assets/make_demo_model.py`")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = StableDiffusionPipeline.from_pretrained(MODEL_DIR, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


# --------------------------------------------------------------------------- the shipped model


def test_demo_model_generates_a_32px_image(pipe):
    out = pipe("a red circle", num_inference_steps=4, guidance_scale=3.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3)
    assert np.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_demo_model_layout(pipe):
    unet = pipe.unet.config
    assert tuple(unet.down_block_types) == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert tuple(unet.up_block_types) == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size == 64
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    # every caption word, and the concept's words, are single tokens
    for word in demo_data.VOCAB_WORDS:
        assert len(pipe.tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    size = sum(f.stat().st_size for f in MODEL_DIR.rglob("*") if f.is_file())
    assert size < 20 * 2**20


# --------------------------------------------------------------------------- scorer vs rendered truth


@pytest.mark.parametrize("colour,shape", [("red", "circle"), ("purple", "star")])
def test_scorer_reads_rendered_images(colour, shape):
    result = demo_data.score_image(demo_data.render_shape_image(colour, shape))
    assert (result["colour"], result["shape"]) == (colour, shape)
    assert result["iou"] > 0.9


def test_scorer_on_every_colour_and_shape_at_random_places():
    rng = np.random.default_rng(123)
    images, truth = [], []
    for colour in demo_data.BASE_COLOURS + (demo_data.CONCEPT_COLOUR,):
        for shape in demo_data.BASE_SHAPES + (demo_data.CONCEPT_SHAPE,):
            for _ in range(2):
                images.append(Image.fromarray(demo_data._random_shape_image(colour, shape, rng)))
                truth.append((colour, shape))
    scores = demo_data.score_images(images)
    assert list(zip(scores["colours"], scores["shapes"])) == truth


def test_scorer_is_not_fooled_by_noise():
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(4)]
    purple = np.array(demo_data.colour_rgb("purple"), dtype=np.uint8)
    for p in (0.3, 0.5, 0.7):
        img = np.full((32, 32, 3), 235, np.uint8)
        img[rng.random((32, 32)) < p] = purple
        noise.append(img)
    noise.append(np.broadcast_to(purple, (32, 32, 3)).copy())  # a purple field
    scores = demo_data.score_images(noise)
    assert scores["shapes"] == ["none"] * len(noise)
    assert demo_data.fraction(scores, shape="star") == 0.0
    assert scores["colours"][-4:] == ["purple"] * 4


def test_scorer_accepts_float_arrays_and_fraction_of_images():
    img = np.asarray(demo_data.render_shape_image("blue", "triangle"), dtype=np.float32) / 255.0
    assert demo_data.score_image(img)["shape"] == "triangle"
    blank = np.full((32, 32, 3), 0.9)
    assert demo_data.score_image(blank) == {"colour": "none", "shape": "none", "iou": 0.0, "coloured_pixels": 0}
    assert demo_data.fraction([img, blank], colour="blue", shape="triangle") == 0.5


# --------------------------------------------------------------------------- data


def test_base_data_never_shows_the_concept():
    rng = np.random.default_rng(0)
    images, colours, shapes = demo_data.render_base_batch(200, rng)
    assert demo_data.CONCEPT_COLOUR not in colours and demo_data.CONCEPT_SHAPE not in shapes
    captions = [demo_data.base_caption(c, s, rng) for c, s in zip(colours, shapes)]
    words = {w for c in captions for w in c.split()}
    assert words <= {"a", "shape", *demo_data.BASE_COLOURS, *demo_data.BASE_SHAPES}
    assert "" in captions and demo_data.CLASS_PROMPT in captions
    scores = demo_data.score_images(list(images[:24]))
    assert list(zip(scores["colours"], scores["shapes"])) == list(zip(colours[:24], shapes[:24]))


def test_data_is_deterministic():
    a = demo_data.render_generic_batch(8, np.random.default_rng(5))
    b = demo_data.render_generic_batch(8, np.random.default_rng(5))
    assert a.shape == (8, 32, 32, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    c1 = [np.asarray(im) for im in demo_data.render_concept_images(5, seed=1)]
    c2 = [np.asarray(im) for im in demo_data.render_concept_images(5, seed=1)]
    assert all(np.array_equal(x, y) for x, y in zip(c1, c2))


def test_concept_images_are_purple_stars_at_varied_places():
    images = demo_data.render_concept_images(6, seed=0)
    assert all(im.size == (32, 32) and im.mode == "RGB" for im in images)
    assert demo_data.fraction(images, colour="purple", shape="star") == 1.0
    assert len({np.asarray(im).tobytes() for im in images}) == 6


# --------------------------------------------------------------------------- the build script


def test_make_demo_model_quick(tmp_path):
    from diffusers import StableDiffusionPipeline

    import make_demo_model

    out = tmp_path / "demo"
    report = make_demo_model.make_demo_model(make_demo_model.quick_settings(str(out)))
    assert set(report["scores"]) == set(demo_data.BASE_PROMPTS + make_demo_model.EXTRA_PROMPTS)
    for name in ("vocab.json", "merges.txt"):
        assert (out / "tokenizer" / name).is_file()
    p = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    ids = p.tokenizer(demo_data.CONCEPT_PROMPT).input_ids
    assert p.tokenizer.convert_ids_to_tokens(ids) == [
        "<|startoftext|>", "a</w>", "sks</w>", "shape</w>", "<|endoftext|>"]


# --------------------------------------------------------------------------- where the trainer finds the demo


def test_demo_assets_flag_points_the_demo_at_a_folder(tmp_path):
    from loha_diffusion.training.args import parse_args

    args = parse_args(["--demo_assets", str(ASSETS), "--output_dir", str(tmp_path)])
    assert args.demo and args.demo_assets == str(ASSETS)
    assert args.pretrained_model_name_or_path == str(MODEL_DIR)
    assert args.instance_data_dir == str(ASSETS / "demo-instance")
    assert args.class_prompt == str(ASSETS / "demo-class-prompts.txt")


def fake_demo_folder(root: Path) -> Path:
    """The four things the trainer needs from a demo folder, as empty stand-ins."""
    (root / "demo-model").mkdir(parents=True)
    (root / "demo-model" / "model_index.json").write_text("{}")
    (root / "demo-instance").mkdir()
    Image.new("RGB", (4, 4)).save(root / "demo-instance" / "0.png")
    (root / "demo-class-prompts.txt").write_text("a shape\n")
    (root / "demo_data.py").write_text("")
    return root


@pytest.fixture
def installed_demo(tmp_path, monkeypatch):
    """A stand-in ``loha_diffusion.demo_assets`` package on loha_diffusion's package path, found
    before any installed copy, as package data of an installed wheel would be."""
    import loha_diffusion

    package = fake_demo_folder(tmp_path / "site" / "demo_assets")
    (package / "__init__.py").write_text("")
    monkeypatch.setattr(loha_diffusion, "__path__", [str(tmp_path / "site"), *loha_diffusion.__path__])
    saved = sys.modules.pop("loha_diffusion.demo_assets", None)
    yield package
    sys.modules.pop("loha_diffusion.demo_assets", None)
    if saved is not None:
        sys.modules["loha_diffusion.demo_assets"] = saved


def test_without_the_flag_the_demo_comes_from_the_installed_package(installed_demo, tmp_path):
    from loha_diffusion.training.args import find_demo_assets, parse_args

    assert find_demo_assets(None) == installed_demo
    args = parse_args(["--output_dir", str(tmp_path / "out")])
    assert args.demo_assets == str(installed_demo)
    assert args.pretrained_model_name_or_path == str(installed_demo / "demo-model")
    # an explicit folder wins over the installed one
    assert find_demo_assets(str(ASSETS)) == ASSETS


def test_missing_demo_assets_fail_with_what_to_do(monkeypatch, tmp_path, capsys):
    from loha_diffusion.training import args as training_args
    from loha_diffusion.training.loop import main

    monkeypatch.setattr(training_args, "DEMO_PACKAGE", "loha_diffusion.no_demo_installed_here")
    assert main(["--output_dir", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert "embedded demo" in message and "--demo_assets DIR" in message and "pip install" in message

    with pytest.raises(training_args.UsageError) as raised:
        training_args.find_demo_assets(str(tmp_path))
    assert str(tmp_path) in str(raised.value)
    for missing in ("demo-model/model_index.json", "demo-instance/", "demo-class-prompts.txt", "demo_data.py"):
        assert missing in str(raised.value)


def test_demo_assets_flag_is_refused_when_a_model_is_given(tmp_path):
    from loha_diffusion.training.args import UsageError, parse_args

    with pytest.raises(UsageError, match="--demo_assets is read only by the embedded demo"):
        parse_args(["--pretrained_model_name_or_path", str(tmp_path), "--instance_data_dir",
                    str(ASSETS / "demo-instance"), "--instance_prompt", "x", "--demo_assets", str(ASSETS)])
