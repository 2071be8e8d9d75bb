"""The Python package against the library's other front door: images byte-equal to `lorafuse
generate`'s PNGs, LoRAs (set_loras and prompt tags), progress, cancel, errors, inspect, merge."""

import threading

import numpy as np
import pytest

import lorafuse
from conftest import LORAS, TINY


def pixels(images):
    return [np.asarray(img) for img in images]


def test_images_equal_the_cli(pipe, cli, tmp_path):
    images = pipe.generate(
        "a watercolor fox",
        "blurry",
        steps=5,
        guidance_scale=6.0,
        seed=7,
        num_images=2,
        batch_size=2,
        scheduler="euler-a",
    )
    expected = cli(
        tmp_path, "-p", "a watercolor fox", "-n", "blurry", "--steps", "5", "--guidance-scale",
        "6.0", "--seed", "7", "--num-images", "2", "--batch-size", "2", "--scheduler", "euler-a",
    )
    assert len(images) == 2 and images.seeds == [7, 8]
    for img, got, (want, params) in zip(images, pixels(images), expected):
        assert got.shape == (64, 64, 3) and got.dtype == np.uint8
        assert np.array_equal(got, want)
        assert img.info["parameters"] == params
    assert images.parameters == [p for _, p in expected]


def test_defaults_come_from_the_library(pipe, cli, tmp_path):
    images = pipe.generate("a cat", output_type="np", steps=3)
    (want, params), = cli(tmp_path, "-p", "a cat", "--steps", "3")
    assert np.array_equal(images[0], want)
    assert f"CFG scale: {lorafuse.DEFAULT_GUIDANCE_SCALE:g}" in images.parameters[0] == params


def test_lora_prompt_tag_equals_the_cli(pipe, cli, tmp_path):
    prompt = "a photo of a cat <lora:diffusers:0.8>"
    images = pipe.generate(prompt, steps=4, seed=1, lora_dir=LORAS, output_type="np")
    (want, params), = cli(
        tmp_path, "-p", prompt, "--steps", "4", "--seed", "1", "--lora-dir", str(LORAS),
        "--lora-mode", "switch",
    )
    assert np.array_equal(images[0], want)
    assert images.parameters[0] == params and "diffusers: 0.8" in params
    assert [w for _, w in pipe.loras] == [pytest.approx(0.8)]
    plain = pipe.generate(prompt, steps=4, seed=1, loras=[], output_type="np")
    assert not np.array_equal(plain[0], want), "the LoRA changed nothing"
    # The CLI's one-shot default, rebuild, against a pipeline opened that way.
    rebuild = lorafuse.Pipeline(TINY, "cpu", lora_mode="rebuild")
    images = rebuild.generate(prompt, steps=4, seed=1, lora_dir=LORAS, output_type="np")
    (want, _), = cli(tmp_path / "rebuild", "-p", prompt, "--steps", "4", "--seed", "1",
                     "--lora-dir", str(LORAS))
    assert np.array_equal(images[0], want)


def test_set_loras_equals_the_cli(pipe, cli, tmp_path):
    lora = LORAS / "kohya.safetensors"
    reports = pipe.set_loras([(lora, 0.7)])
    assert len(reports) == 1 and isinstance(reports[0], dict)
    assert pipe.lora_mode == "switch"
    images = pipe.generate("a house", steps=4, seed=2, output_type="np")
    (want, params), = cli(
        tmp_path, "-p", "a house", "--steps", "4", "--seed", "2", "--lora", f"{lora}:0.7",
        "--lora-mode", "switch",
    )
    assert np.array_equal(images[0], want)
    assert images.parameters[0] == params
    pipe.set_loras([])
    assert pipe.loras == []


def test_progress_is_called_every_step(pipe):
    calls = []
    pipe.generate("a cat", steps=5, num_images=2, progress=lambda s, t: calls.append((s, t)))
    total = calls[-1][1]
    assert total >= 2 * 5
    assert calls == [(s, total) for s in range(1, total + 1)]


def test_cancel_from_the_callback(pipe):
    calls = []

    def progress(step, total):
        calls.append(step)
        if step == 2:
            pipe.cancel()

    with pytest.raises(lorafuse.Cancelled):
        pipe.generate("a cat", steps=10, progress=progress)
    assert calls == [1, 2]
    with pytest.raises(lorafuse.Cancelled):
        pipe.generate("a cat", steps=10, progress=lambda s, t: s < 3)
    with pytest.raises(ZeroDivisionError):
        pipe.generate("a cat", steps=10, progress=lambda s, t: 1 / 0)
    # The pipeline is fine afterwards.
    assert len(pipe.generate("a cat", steps=2)) == 1


def test_cancel_from_another_thread(pipe):
    started = threading.Event()
    canceller = threading.Thread(target=lambda: (started.wait(60), pipe.cancel()))
    canceller.start()
    with pytest.raises(lorafuse.Cancelled):
        pipe.generate("a cat", steps=500, progress=lambda s, t: started.set())
    canceller.join()


def test_errors_name_the_file(tmp_path):
    missing = tmp_path / "no-such-pipeline"
    with pytest.raises(lorafuse.LorafuseError, match="no-such-pipeline") as e:
        lorafuse.Pipeline(missing, "cpu")
    assert isinstance(e.value, lorafuse.UserError) and e.value.fault == "user"
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    pipe = lorafuse.Pipeline(TINY, "cpu")
    with pytest.raises(lorafuse.FileError, match="broken.safetensors") as e:
        pipe.set_loras([bad])
    assert e.value.fault == "file"
    with pytest.raises(lorafuse.UserError, match="device"):
        lorafuse.Pipeline(TINY, "tpu")
    with pytest.raises(lorafuse.UserError, match="optimize"):
        lorafuse.Pipeline(TINY, "cpu", float16=True)
    with pytest.raises(lorafuse.UserError):
        pipe.generate("a cat", width=63)
    with pytest.raises(lorafuse.UserError, match="output_type"):
        pipe.generate("a cat", steps=1, output_type="jpeg")
    assert issubclass(lorafuse.Cancelled, lorafuse.LorafuseError)
    assert issubclass(lorafuse.InternalError, lorafuse.LorafuseError)


def test_inspect_returns_dicts():
    info = lorafuse.inspect(TINY)
    assert {m["component"] for m in info["models"]} >= {"unet", "text_encoder", "vae_decoder"}
    lora = lorafuse.inspect(LORAS / "kohya.safetensors")
    assert lora["lora"]["unet_modules"] > 0


def test_merge_writes_a_folder(tmp_path):
    out = tmp_path / "merged"
    report = lorafuse.merge(TINY, out, [(LORAS / "diffusers.safetensors", 0.8)])
    assert isinstance(report, dict)
    assert (out / "unet" / "model.onnx").is_file()
    images = lorafuse.Pipeline(out, "cpu").generate("a cat", steps=2, output_type="np")
    assert images[0].shape == (64, 64, 3)


def test_a_panic_is_an_internal_error(monkeypatch):
    monkeypatch.setenv("LORAFUSE_PY_INJECT_PANIC", "inspect")
    with pytest.raises(lorafuse.InternalError, match="panic") as e:
        lorafuse.inspect(TINY)
    assert e.value.fault == "program"
    monkeypatch.delenv("LORAFUSE_PY_INJECT_PANIC")
    assert lorafuse.inspect(LORAS / "kohya.safetensors")["lora"]


def test_the_diffusers_style_host_example(tmp_path):
    import importlib.util
    import sys
    from pathlib import Path

    from PIL import Image

    path = Path(__file__).resolve().parents[1] / "examples" / "host_loop.py"
    spec = importlib.util.spec_from_file_location("host_loop", path)
    example = importlib.util.module_from_spec(spec)
    sys.modules["host_loop"] = example  # dataclasses look their module up there
    spec.loader.exec_module(example)
    written = example.main(
        [str(TINY), "--lora-dir", str(LORAS), "--device", "cpu", "--steps", "2", "--out", str(tmp_path)]
    )
    assert len(written) == 3
    with Image.open(written[-1]) as img:
        assert "diffusers: 0.8" in img.info["parameters"]
    pipe = example.LorafuseDiffusionPipeline.from_pretrained(str(TINY), "cpu")
    pipe.load_lora_weights(str(LORAS / "kohya.safetensors"), adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.5])
    out = pipe("a cat", num_inference_steps=2, generator=3, output_type="np")
    assert out.images[0].shape == (64, 64, 3) and out.nsfw_content_detected is None
    pipe.unload_lora_weights()
    assert pipe.pipeline.loras == []
