"""The encoded entry point (``littlebig_encoded`` = ``decode`` -> ``littlebig``) on the real tritonserver.

Real photographs (scikit-image's), re-encoded at several sizes, qualities and formats: the server's decoding
equals ``fit_to_service`` on the client byte for byte, and every answer equals the pixel path's. Bad bytes
get INVALID_ARGUMENT per request while the good requests of the same execute are answered.
"""

from __future__ import annotations

import io
import json
import re
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from littlebig.client import InputError, LittleBigClient
from littlebig.data import read_image
from littlebig.imaging import ImageError, decode_to_service

#: scikit-image's photographs (file, as shipped): RGB PNGs and JPEGs, an RGBA PNG, a greyscale PNG.
PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "motorcycle_left.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "horse.png",
    "camera.png",
)


def skimage_photo(name: str) -> Path:
    skdata = pytest.importorskip("skimage.data")  # the dev extra installs scikit-image
    return Path(skdata.__file__).parent / name


def encode(img: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def variants(name: str, img: Image.Image) -> dict[str, bytes]:
    """One photo as a user's files: as shipped, and re-encoded at other sizes, qualities, formats and modes."""
    stem = Path(name).stem
    rgb = img.convert("RGB")

    def scaled(long_side: int) -> Image.Image:
        s = long_side / max(img.size)
        return rgb.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.Resampling.LANCZOS)

    out = {name: skimage_photo(name).read_bytes()}
    out[f"{stem}-600-q95.jpg"] = encode(scaled(600), "JPEG", quality=95)
    out[f"{stem}-384-q75-progressive.jpg"] = encode(scaled(384), "JPEG", quality=75, progressive=True)
    out[f"{stem}-224-q50-420.jpg"] = encode(scaled(224), "JPEG", quality=50, subsampling=2)
    out[f"{stem}-300.png"] = encode(scaled(300), "PNG")
    return out


def mode_variants(img: Image.Image) -> dict[str, bytes]:
    """Colour modes a pipeline writes: palette, greyscale, greyscale+alpha, 16-bit, CMYK JPEG, greyscale JPEG."""
    small = img.convert("RGB").resize((320, 213), Image.Resampling.LANCZOS)
    grey16 = Image.fromarray((np.asarray(small.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    return {
        "palette.png": encode(small.quantize(64), "PNG"),
        "grey.png": encode(small.convert("L"), "PNG"),
        "grey-alpha.png": encode(small.convert("LA"), "PNG"),
        "grey16.png": encode(grey16, "PNG"),
        "cmyk.jpg": encode(small.convert("CMYK"), "JPEG", quality=90),
        "grey.jpg": encode(small.convert("L"), "JPEG", quality=85),
        "tiny-40x25.png": encode(small.resize((40, 25)), "PNG"),
    }


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """The photo files on disk (the client reads them back), 52 in all."""
    root = tmp_path_factory.mktemp("photos")
    files: dict[str, bytes] = {}
    for name in PHOTOS:
        with Image.open(skimage_photo(name)) as img:
            img.load()
            files.update(variants(name, img))
            if name == "coffee.png":
                files.update(mode_variants(img))
    paths = []
    for fname, data in files.items():
        (root / fname).write_bytes(data)
        paths.append(root / fname)
    return paths


def bytes_rows(datas: list[bytes]) -> np.ndarray:
    rows = np.empty((len(datas), 1), dtype=np.object_)
    for i, d in enumerate(datas):
        rows[i, 0] = d
    return rows


def infer_encoded(client, datas: list[bytes], model="littlebig_encoded", parameters=None, outputs=None):
    inp = grpcclient.InferInput("ENCODED", [len(datas), 1], "BYTES")
    inp.set_data_from_numpy(bytes_rows(datas))
    return client.infer(model, [inp], parameters=parameters, outputs=outputs)


def infer_pixels(client, images: np.ndarray, parameters=None):
    inp = grpcclient.InferInput("IMAGE", list(images.shape), "UINT8")
    inp.set_data_from_numpy(images)
    return client.infer("littlebig", [inp], parameters=parameters)


def service_size(repository: Path) -> tuple[int, int, int]:
    return tuple(json.loads((repository / "littlebig-repository.json").read_text())["service_size"])


def stats(client, model: str):
    s = client.get_inference_statistics(model).model_stats[0]
    return s.inference_count, s.execution_count


CASCADE_OUTPUTS = ("LABEL", "ESCALATED", "DEGRADED", "REASON", "PROBS")


def assert_same_answers(a, b) -> None:
    for name in CASCADE_OUTPUTS:
        assert np.array_equal(a.as_numpy(name), b.as_numpy(name)), f"{name} differs between the entry points"


# ---- bad bytes -------------------------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height 8-bit grey, with a few bytes of zlib data: ~100 bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096, 9)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def jpeg_bomb(jpeg: bytes, width: int, height: int) -> bytes:
    """A real JPEG whose frame header (SOF0) is rewritten to declare width x height."""
    at = jpeg.index(b"\xff\xc0") + 5  # marker, length (2), precision (1), then height, width
    return jpeg[:at] + struct.pack(">HH", height, width) + jpeg[at + 4 :]


def bad_files(good_jpeg: bytes, good_png: bytes) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, what the error must say)."""
    img = Image.open(io.BytesIO(good_png)).convert("RGB")
    corrupt_png = bytearray(good_png)
    corrupt_png[20] ^= 0xFF  # inside IHDR: its CRC no longer matches
    body = good_jpeg.index(b"\xff\xda")  # start of scan: everything after is entropy-coded data
    return {
        "empty": (b"", "empty"),
        "truncated.jpg": (good_jpeg[: len(good_jpeg) // 2], "truncated JPEG"),
        "truncated.png": (good_png[: len(good_png) // 2], "truncated PNG|corrupt PNG"),
        "corrupt-header.png": (bytes(corrupt_png), "corrupt PNG: its header cannot be read"),
        "corrupt-markers.jpg": (good_jpeg[:body] + b"\xff\xd9" * 64, "truncated JPEG|corrupt JPEG"),
        "gif": (encode(img, "GIF"), "a GIF file, not JPEG or PNG"),
        "bmp": (encode(img, "BMP"), "a BMP file, not JPEG or PNG"),
        "webp": (encode(img, "WEBP"), "a RIFF/WebP file, not JPEG or PNG"),
        "text": (b"hello, this is not an image", "not a JPEG or PNG file"),
        "bomb.png": (png_bomb(100_000, 100_000), "decompression bomb refused: PNG declares 100000x100000"),
        "bomb.jpg": (
            jpeg_bomb(encode(img.resize((16, 16)), "JPEG"), 60_000, 60_000),
            "decompression bomb refused: JPEG declares 60000x60000",
        ),
    }


@pytest.fixture(scope="module")
def bad(photos) -> dict[str, tuple[bytes, str]]:
    by_name = {p.name: p.read_bytes() for p in photos}
    return bad_files(by_name["chelsea-600-q95.jpg"], by_name["chelsea-300.png"])


def test_bad_bytes_are_refused_in_process(bad):
    """The shared decoder names every problem; the bombs are refused from their header alone (here by Pillow's
    own limit first, which the decode model turns off: the server test checks the full message)."""
    for data, why in bad.values():
        with pytest.raises(ImageError, match=why.split(":")[0]):
            decode_to_service(data, (28, 28, 1))
    assert len(bad["bomb.png"][0]) < 200 and len(bad["bomb.jpg"][0]) < 1_000


# ---- through the real server -----------------------------------------------------------------------------


def test_server_decodes_every_photo_byte_for_byte(grpc_client, repository, photos):
    """decode's IMAGE for each file equals fit_to_service on the client (read_image), in batches of 8."""
    size = service_size(repository)
    for start in range(0, len(photos), 8):
        files = photos[start : start + 8]
        served = infer_encoded(grpc_client, [f.read_bytes() for f in files], model="decode").as_numpy("IMAGE")
        for f, image in zip(files, served):
            assert np.array_equal(image, read_image(f, size)), f"{f.name}: decoded pixels differ"


@pytest.mark.parametrize("parameters", [None, {"threshold": 1}, {"threshold": "0"}])
def test_encoded_answers_equal_the_pixel_path(grpc_client, repository, photos, parameters):
    """Same files, same batches: LABEL, PROBS, ESCALATED, DEGRADED and REASON equal; request parameters pass
    through the ensemble to littlebig (T = 1 escalates every row, T = 0 none)."""
    size = service_size(repository)
    escalated = []
    for start in range(0, len(photos), 16):
        files = photos[start : start + 16]
        encoded = infer_encoded(grpc_client, [f.read_bytes() for f in files], parameters=parameters)
        pixels = infer_pixels(grpc_client, np.stack([read_image(f, size) for f in files]), parameters=parameters)
        assert_same_answers(encoded, pixels)
        escalated.append(encoded.as_numpy("ESCALATED").reshape(-1))
    escalated = np.concatenate(escalated)
    if parameters is not None:
        assert escalated.all() == (parameters["threshold"] == 1) and escalated.any() == (parameters["threshold"] == 1)


def test_bad_bytes_get_invalid_argument_and_the_rest_of_the_batch_is_answered(server, grpc_client, photos, bad):
    """Every bad file in its own request, in flight together with good requests: each bad one gets
    INVALID_ARGUMENT naming its problem, each good one its answer; decode ran fewer executes than requests,
    so bad and good requests shared executes."""
    good = [p.read_bytes() for p in photos[:12]]
    work = [("good", [g]) for g in good] + [(name, [data]) for name, (data, _) in bad.items()]
    work.insert(3, ("one bad row", [good[0], bad["truncated.jpg"][0], good[1]]))
    reference = {i: infer_encoded(grpc_client, [g]) for i, g in enumerate(good)}
    _, executions_before = stats(grpc_client, "decode")
    url = f"127.0.0.1:{server.ports.grpc}"

    def send(item):
        client = grpcclient.InferenceServerClient(url)
        try:
            return infer_encoded(client, item[1])
        except InferenceServerException as exc:
            return exc
        finally:
            client.close()

    for _ in range(3):  # three rounds, all requests of a round in flight at once
        with ThreadPoolExecutor(len(work)) as pool:
            results = list(pool.map(send, work))
        good_seen = 0
        for (name, _), result in zip(work, results):
            if name == "good":
                assert not isinstance(result, Exception), f"a good request failed: {result}"
                assert_same_answers(result, reference[good_seen])
                good_seen += 1
                continue
            assert isinstance(result, InferenceServerException), f"{name}: answered instead of refused"
            assert result.status() == "StatusCode.INVALID_ARGUMENT", f"{name}: {result.status()} {result.message()}"
            why = "row 1: truncated JPEG" if name == "one bad row" else bad[name][1]
            assert re.search(why, result.message()), f"{name}: {result.message()}"
    _, executions_after = stats(grpc_client, "decode")
    assert executions_after - executions_before < 3 * len(work)
    # the server is still fine
    assert_same_answers(infer_encoded(grpc_client, [good[0]]), reference[0])


# ---- the client and the CLI --------------------------------------------------------------------------------


def test_client_sends_files_encoded_by_default_and_pixels_on_request(server, grpc_client, photos, build_dir):
    url = f"127.0.0.1:{server.ports.grpc}"
    files = photos[:20]
    rows_before, _ = stats(grpc_client, "decode")
    with LittleBigClient(url) as client:
        encoded = client.classify(files)
        assert client.encoded_service is not None and client.encoded_service.model == "littlebig_encoded"
        rows_mid, _ = stats(grpc_client, "decode")
        assert rows_mid - rows_before == len(files)  # every file went as bytes
        pixels_of_files = np.stack([read_image(f, client.service.size) for f in files])
        from_array = client.classify(pixels_of_files)  # arrays always go as pixels
        assert stats(grpc_client, "decode")[0] == rows_mid
    with LittleBigClient(url, send="pixels") as client:
        pixels = client.classify(files)
    assert stats(grpc_client, "decode")[0] == rows_mid
    assert encoded.files == pixels.files == [str(f) for f in files]
    for other in (pixels, from_array):
        assert np.array_equal(encoded.labels, other.labels) and np.array_equal(encoded.escalated, other.escalated)
        assert np.array_equal(encoded.probs, other.probs) and np.array_equal(encoded.reasons, other.reasons)


def test_async_client_sends_encoded_and_names_a_bad_file(server, photos, tmp_path, bad):
    import asyncio

    from littlebig.client import AsyncLittleBigClient

    url = f"127.0.0.1:{server.ports.grpc}"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(bad["truncated.jpg"][0])

    async def run():
        async with AsyncLittleBigClient(url) as client:
            encoded = await client.classify(photos[:10])
            assert (await client.encoded_service()) is not None
            with pytest.raises(InputError, match=r"broken.jpg: not a readable image \(truncated JPEG"):
                await client.classify([*photos[:3], broken])
        async with AsyncLittleBigClient(url, send="pixels") as client:
            return encoded, await client.classify(photos[:10])

    encoded, pixels = asyncio.run(run())
    assert np.array_equal(encoded.labels, pixels.labels) and np.array_equal(encoded.probs, pixels.probs)


def test_classify_cli_encoded_and_pixels_give_the_same_records(server, photos, tmp_path, bad):
    url = f"127.0.0.1:{server.ports.grpc}"
    cli = [sys.executable, "-m", "littlebig.cli", "classify", "--url", url, "--json", "--top-k", "3"]
    files = [str(p) for p in photos[:6]]
    encoded = subprocess.run([*cli, *files], capture_output=True, text=True, timeout=60)
    pixels = subprocess.run([*cli, "--send", "pixels", *files], capture_output=True, text=True, timeout=60)
    assert encoded.returncode == 0 and pixels.returncode == 0, encoded.stderr + pixels.stderr
    assert json.loads(encoded.stdout) == json.loads(pixels.stdout)
    assert [r["file"] for r in json.loads(encoded.stdout)] == files
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bad["bomb.png"][0])
    refused = subprocess.run([*cli, files[0], str(bomb)], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert "bomb.png: not a readable image (decompression bomb refused" in refused.stderr


# ---- the decoder at an RGB service size, with a small pixel limit ---------------------------------------------

#: floor(224 / 0.875): the default service size of a pair whose big is efficientnet_b0 (timm's eval resize)
RGB_SIZE = (256, 256, 3)
SMALL_LIMIT = 200_000  # chelsea (451x300 = 135,300 pixels) passes, astronaut (512x512 = 262,144) does not


@pytest.fixture(scope="module")
def rgb_decoder(tmp_path_factory):
    """A second real server holding only ``decode`` at 224x224x3, generated with max_image_pixels 200,000."""
    from tritonclient.grpc import model_config_pb2 as mc

    from littlebig.model_repository.generate import ServeOptions, write_decoder
    from tests.conftest import start_server

    repo = tmp_path_factory.mktemp("rgb-decoder") / "model_repository"
    opts = ServeOptions(max_image_pixels=SMALL_LIMIT)
    write_decoder(repo, list(RGB_SIZE), opts, 64, mc.ModelInstanceGroup.KIND_CPU)
    srv = start_server(repo, tmp_path_factory.mktemp("rgb-decoder-log"))
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.ports.grpc}")
    try:
        yield client
    finally:
        client.close()
        srv.stop()


def test_rgb_decoding_is_byte_for_byte_and_the_pixel_limit_is_configurable(rgb_decoder, photos):
    def pixels(path: Path) -> int:
        with Image.open(path) as img:
            return img.width * img.height

    small = [p for p in photos if pixels(p) <= SMALL_LIMIT]
    assert len(small) >= 30
    for start in range(0, len(small), 8):
        files = small[start : start + 8]
        served = infer_encoded(rgb_decoder, [f.read_bytes() for f in files], model="decode").as_numpy("IMAGE")
        for f, image in zip(files, served):
            assert np.array_equal(image, read_image(f, RGB_SIZE)), f"{f.name}: decoded pixels differ"
    # section 5: what the server decodes, centre-cropped as big's graph does, is timm's eval transform of the file
    timm_data = pytest.importorskip("timm.data")
    transform = timm_data.create_transform(
        input_size=(3, 224, 224), crop_pct=0.875, interpolation="bicubic", mean=(0, 0, 0), std=(1, 1, 1)
    )
    chosen = {"chelsea.png", "horse.png", "coffee-384-q75-progressive.jpg", "rocket-384-q75-progressive.jpg"}
    originals = [p for p in small if p.name in chosen]
    assert len(originals) == len(chosen)
    served = infer_encoded(rgb_decoder, [f.read_bytes() for f in originals], model="decode").as_numpy("IMAGE")
    for f, image in zip(originals, served):
        with Image.open(f) as img:
            expected = np.rint(transform(img.convert("RGB")).numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
        assert np.array_equal(image[16:240, 16:240], expected), f"{f.name}: big's crop differs from timm's"
    with pytest.raises(
        InferenceServerException,
        match=r"row 0: decompression bomb refused: PNG declares 512x512 = "
        r"262,144 pixels, more than the limit of 200,000 \(--max-image-pixels\)",
    ) as refused:
        infer_encoded(rgb_decoder, [skimage_photo("astronaut.png").read_bytes()], model="decode")
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_gpu_profile_keeps_the_cpu_decoder_and_writes_the_gpu_one_marked_not_run(build_dir, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from littlebig.model_repository.generate import ServeOptions, generate

    def decode_config(out: Path) -> mc.ModelConfig:
        return text_format.Parse((out / "decode" / "config.pbtxt").read_text(), mc.ModelConfig())

    generate(build_dir, tmp_path / "gpu", "gpu")
    default = decode_config(tmp_path / "gpu")
    assert default.parameters["decoder"].string_value == "pillow"
    assert default.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert (tmp_path / "gpu" / "littlebig_encoded" / "config.pbtxt").exists()
    generate(build_dir, tmp_path / "gpu-nvimgcodec", "gpu", ServeOptions(decoder="nvimgcodec"))
    gpu = decode_config(tmp_path / "gpu-nvimgcodec")
    assert gpu.parameters["decoder"].string_value == "nvimgcodec"
    assert "never run" in gpu.parameters["not_run"].string_value
    assert gpu.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    source = (tmp_path / "gpu-nvimgcodec" / "decode" / "1" / "model.py").read_text()
    compile(source, "model.py", "exec")
    assert "NOT RUN" in source and "nvimgcodec.Decoder()" in source
    with pytest.raises(ValueError, match="gpu profile only"):
        generate(build_dir, tmp_path / "cpu-nvimgcodec", "cpu", ServeOptions(decoder="nvimgcodec"))


def test_perf_analyzer_input_data_holds_each_file_as_one_bytes_element(photos, tmp_path):
    """bench/encoded.py's --input-data for BYTES: base64 of the serialized element (length, then the file)."""
    import base64

    from bench.encoded import write_bytes_input_data

    files = photos[:5]
    entries = json.loads(write_bytes_input_data(files, tmp_path / "input.json").read_text())["data"]
    assert len(entries) == len(files)
    for f, entry in zip(files, entries):
        raw = base64.b64decode(entry["ENCODED"]["b64"])
        assert entry["ENCODED"]["shape"] == [1]
        assert struct.unpack("<I", raw[:4])[0] == len(raw) - 4 and raw[4:] == f.read_bytes()
