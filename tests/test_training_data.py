"""The trainer's data pipeline against hand computations: buckets, SDXL time ids, EXIF and image
modes, the latent cache on disk, and the flags that cannot go together."""
import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from loha_diffusion.training.args import UsageError, parse_args
from loha_diffusion.training.buckets import BucketBatchSampler, BucketPlan, Placement, bucket_resolutions
from loha_diffusion.training.data import DreamBoothDataset, collate, time_ids
from loha_diffusion.training.images import in_memory_records, scan_folder, scan_hf_dataset, to_rgb
from loha_diffusion.training.latent_cache import build_latent_cache
from tiny_models import tiny_sd15_vae


# -- buckets --------------------------------------------------------------------------------
def test_bucket_list_follows_kohyas_area_rule():
    # resolution 512, 256..1024 in steps of 64: for each width, the tallest multiple of 64 whose
    # area stays within 512*512 (capped at 1024), and its transpose
    hand = {(256, 1024), (320, 768), (384, 640), (448, 576), (512, 512), (576, 448), (640, 384), (704, 320),
            (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256)}
    hand |= {(h, w) for w, h in hand}
    assert set(bucket_resolutions(512, 256, 1024, 64)) == hand


@pytest.mark.parametrize("size,expected", [
    # 16:9 -> 640x384 (aspect 1.667 is nearest 1.778); scale max(640/1920, 384/1080) = 0.3556
    ((1920, 1080), Placement((1920, 1080), (683, 384), (640, 384))),
    # 3:4 -> 448x576 (0.778 nearest 0.75); scale max(448/768, 576/1024) = 0.5833
    ((768, 1024), Placement((768, 1024), (448, 597), (448, 576))),
    ((512, 512), Placement((512, 512), (512, 512), (512, 512))),
])
def test_images_go_to_the_nearest_bucket_and_cover_it(size, expected):
    assert BucketPlan(512, enable=True).place(*size) == expected


def test_no_upscale_keeps_small_images_and_shrinks_large_ones_to_the_area():
    plan = BucketPlan(512, enable=True, no_upscale=True)
    # smaller than 512^2: kept, bucket rounded down to 64
    assert plan.place(300, 200) == Placement((300, 200), (300, 200), (256, 192))
    # 2:1 above the area: sqrt(512^2 * 2) = 724 -> 704 wide gives 2.2, 362 -> 320 high gives 2.0: height wins
    assert plan.place(2000, 1000) == Placement((2000, 1000), (640, 320), (640, 320))


def test_without_buckets_every_image_is_the_resolution_square():
    assert BucketPlan(64).place(100, 50) == Placement((100, 50), (128, 64), (64, 64))


def test_each_batch_comes_from_one_bucket_and_the_order_is_drawn_from_seed_and_epoch():
    buckets = ["a", "b", "a", "c", "b", "a", "a", "c", "b"]
    sampler = BucketBatchSampler(buckets, 2, seed=3)
    first = list(sampler)
    assert len(first) == len(sampler) == 2 + 2 + 1          # a: 4 -> 2 batches, b: 3 -> 2, c: 2 -> 1
    assert sorted(i for batch in first for i in batch) == list(range(len(buckets)))
    assert all(len({buckets[i] for i in batch}) == 1 for batch in first)
    assert list(BucketBatchSampler(buckets, 2, seed=3)) == first   # same seed and epoch: same batches
    sampler.use_epoch(1)
    assert list(sampler) != first


# -- SDXL time ids ----------------------------------------------------------------------------
def test_time_ids_of_a_known_image_and_crop():
    # resolution 32, buckets 16..64 in 16s: (16,48) (16,64) (32,32) (48,16) (64,16). A 90x40 image
    # (aspect 2.25) goes to 48x16 (aspect 3), is resized by max(48/90, 16/40) to 48x21 and
    # centre-cropped 2 rows down: (orig h, orig w, top, left, target h, target w)
    plan = BucketPlan(32, enable=True, min_reso=16, max_reso=64, steps=16)
    image = Image.new("RGB", (90, 40), (10, 200, 30))
    dataset = DreamBoothDataset(in_memory_records([(image, "x")]), None, plan, center_crop=True, random_flip=False)
    batch = collate([dataset[0]])
    assert batch["pixels"].shape == (1, 3, 16, 48)
    assert batch["time_ids"].tolist() == [[40.0, 90.0, 2.0, 0.0, 16.0, 48.0]]


def test_a_flipped_crop_is_measured_from_the_flipped_left_edge():
    placement = Placement((40, 90), (21, 48), (16, 48))      # 5 columns to spare
    assert time_ids(placement, (2, 0), flip=False).tolist() == [90, 40, 0, 2, 48, 16]
    assert time_ids(placement, (2, 0), flip=True).tolist() == [90, 40, 0, 21 - 2 - 16, 48, 16]


# -- decoding ---------------------------------------------------------------------------------
def halves(width, height, left, right, mode="RGB"):
    image = Image.new(mode, (width, height), left)
    image.paste(Image.new(mode, (width // 2, height), right), (width // 2, 0))
    return image


def test_an_exif_rotated_jpeg_arrives_upright(tmp_path):
    # stored 60x30, red left / blue right, tagged orientation 6: shown turned 90 degrees clockwise,
    # i.e. 30 wide, 60 high, red on top
    exif = Image.Exif()
    exif[0x0112] = 6
    halves(60, 30, (255, 0, 0), (0, 0, 255)).save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    (record,) = scan_folder(tmp_path, "a photo", "instance")
    assert record.size == (30, 60)
    pixels = np.asarray(record.load(), dtype=int)
    assert pixels.shape == (60, 30, 3)
    assert pixels[5, 15, 0] > 200 and pixels[5, 15, 2] < 60      # top: red
    assert pixels[55, 15, 2] > 200 and pixels[55, 15, 0] < 60    # bottom: blue


def test_every_mode_becomes_8_bit_rgb():
    gray = to_rgb(Image.new("L", (4, 4), 77))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (77, 77, 77)
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert to_rgb(palette).getpixel((0, 0)) == (10, 20, 30)
    cmyk = to_rgb(Image.new("CMYK", (4, 4), (0, 255, 255, 0)))        # no black, full magenta+yellow: red
    assert cmyk.getpixel((0, 0)) == (255, 0, 0)
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (0, 0, 255, 255))
    rgba.putpixel((2, 2), (0, 0, 0, 128))
    on_white = to_rgb(rgba)
    assert on_white.getpixel((0, 0)) == (255, 255, 255) and on_white.getpixel((1, 1)) == (0, 0, 255)
    assert all(abs(c - 127) <= 1 for c in on_white.getpixel((2, 2)))  # half-transparent black on white
    sixteen = Image.fromarray(np.array([[0, 32768], [65535, 65535]], dtype=np.uint16))
    buffer = io.BytesIO()
    sixteen.save(buffer, "PNG")
    decoded = to_rgb(Image.open(io.BytesIO(buffer.getvalue())))
    assert [decoded.getpixel(p)[0] for p in ((0, 0), (1, 0), (0, 1))] == [0, 128, 255]  # v / 65535 * 255


def test_undecodable_files_are_skipped_with_one_warning_naming_them(tmp_path, caplog):
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "good.png").read_bytes()[:40])
    with caplog.at_level(logging.WARNING):
        records = scan_folder(tmp_path, "x", "instance")
    assert [r.source.name for r in records] == ["good.png"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "broken.png" in warnings[0] and "truncated.png" in warnings[0]


def test_a_datasets_imagefolder_is_read_lazily(tmp_path):
    halves(20, 10, (255, 0, 0), (0, 255, 0)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a red green card"}\n')
    (record,) = scan_hf_dataset(str(tmp_path), None, "image", "text", None)
    assert (record.caption, record.size) == ("a red green card", (20, 10))
    assert record.load().getpixel((15, 5)) == (0, 255, 0)


# -- latent cache -----------------------------------------------------------------------------
def test_a_corrupt_or_stale_latent_cache_file_is_remade(tmp_path, caplog):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    records = scan_folder(tmp_path, "x", "instance")
    plan = BucketPlan(16, enable=True, min_reso=8, max_reso=32, steps=8)
    dataset = DreamBoothDataset(records, None, plan, center_crop=True, random_flip=True)
    vae = tiny_sd15_vae()

    def build():
        return build_latent_cache(dataset, vae, "cpu", True, True, tmp_path / "fallback", False,
                                  lambda b: (8, b[1] // 2, b[0] // 2))

    first = build()
    files = sorted(tmp_path.glob("img.*.latents.safetensors"))
    assert len(files) == 2 and len(first) == 2                     # plain and flipped
    placement = dataset.instance_placements[0]
    # the oracle: the VAE on the centre crop, flipped by hand
    from loha_diffusion.training.data import render
    pixels = render(records[0], placement, ((placement.resized[0] - placement.bucket[0]) // 2,
                                            (placement.resized[1] - placement.bucket[1]) // 2), False)
    with torch.no_grad():
        expected = vae.encode(pixels.flip(-1)[None]).latent_dist.parameters[0]
    torch.testing.assert_close(first[(records[0], placement, True)], expected)

    files[0].write_bytes(b"garbage" * 10)
    with caplog.at_level(logging.WARNING):
        second = build()
    assert "encoding it again" in caplog.text
    for key in first:
        assert torch.equal(first[key], second[key])
    # re-made and readable: a 40x24 image (aspect 1.67) is in the 16x16 bucket, so (2 x 4 channels, 8, 8)
    assert all(load_file(str(f))["latent_params"].shape == (8, 8, 8) for f in files)

    Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(tmp_path / "img.png")  # new content
    dataset = DreamBoothDataset(scan_folder(tmp_path, "x", "instance"), None, plan, center_crop=True,
                                random_flip=True)
    build()
    assert len(list(tmp_path.glob("img.*.latents.safetensors"))) == 4   # a changed image gets its own entries


# -- flags ------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,message", [
    (["--cache_latents"], "--center_crop"),
    (["--cache_text_encoder_outputs", "--train_text_encoder"], "needs frozen text encoders"),
    (["--bucket_no_upscale"], "only with --enable_bucket"),
    (["--enable_bucket", "--min_bucket_reso", "100"], "multiple of --bucket_reso_steps"),
])
def test_flags_that_cannot_go_together_are_refused(tmp_path, flags, message):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(UsageError, match=message):
        parse_args(["--pretrained_model_name_or_path", "x", "--instance_data_dir", str(tmp_path),
                    "--instance_prompt", "x", *flags])


@pytest.mark.parametrize("family,index,clip_skip,unused", [
    ("sd1", 0, None, []), ("sd1", 0, 2, [11]), ("sd1", 0, 3, [10, 11]),
    ("sdxl", 0, None, [11]), ("sdxl", 1, None, []),       # SDXL: penultimate of the first; the second's pooled
])
def test_text_encoder_layers_past_the_conditioning_get_no_adapter(family, index, clip_skip, unused):
    import re

    from loha_diffusion.training.adapters import unused_layers_pattern
    from loha_diffusion.training.setup import layers_used

    pattern = unused_layers_pattern(12, layers_used(family, index, 12, clip_skip))
    excluded = [i for i in range(12) if pattern and re.fullmatch(pattern, f"text_model.encoder.layers.{i}.mlp.fc1")]
    assert excluded == unused
