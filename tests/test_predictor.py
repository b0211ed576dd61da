import numpy as np
import pytest
import torch
from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

from napari_vlsm.core.models.loading import load_model
from napari_vlsm.core.images.postprocess import logits_to_probs
from napari_vlsm.core.inference.predictor import Predictor


@pytest.fixture(scope="module")
def clipseg(tiny_clipseg):
    return load_model(tiny_clipseg, device="cpu")


def count_encoder_calls(backend) -> list:
    calls = []
    backend.module.clip.vision_model.embeddings.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_matches_stock_pipeline(tiny_clipseg, clipseg, polyp_image):
    prompts = ["polyp", "one small pink circle polyp, located in right of the image"]
    pred = Predictor(clipseg)
    pred.set_image(polyp_image)
    ours = pred.predict(prompts).probs

    stock = CLIPSegForImageSegmentation.from_pretrained(tiny_clipseg).eval()
    proc = CLIPSegProcessor(image_processor=clipseg.image_processor, tokenizer=clipseg.tokenizer)
    inputs = proc(text=prompts, images=[polyp_image] * 2, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        ref = logits_to_probs(stock(**inputs).logits, polyp_image.shape[:2])
    assert ours.shape == (2, *polyp_image.shape[:2])
    np.testing.assert_allclose(ours, ref, atol=5e-5)  # fp32 reordering (shorter padding)
    assert ref.std() > 1e-3  # a random model still gives a non-trivial map


def test_prompts_that_share_a_first_word_get_their_own_answers(clipseg, polyp_image):
    pred = Predictor(clipseg)
    pred.set_image(polyp_image)
    asked = {p: pred.predict(p).probs[0] for p in ("polyp", "polyp border")}
    for p in ("polyp", "polyp border"):
        fresh = Predictor(clipseg)
        fresh.set_image(polyp_image)
        np.testing.assert_allclose(asked[p], fresh.predict(p).probs[0], atol=1e-5)
    assert np.abs(asked["polyp"] - asked["polyp border"]).max() > 1e-3
    # two prompts in one batch take other matmul kernels than one: float32 rounding, no more
    np.testing.assert_allclose(pred.predict(["polyp border", "polyp"]).probs, [asked["polyp border"], asked["polyp"]],
                               atol=1e-4)


def test_second_prompt_reuses_image_features(clipseg, polyp_image):
    calls = count_encoder_calls(clipseg)
    pred = Predictor(clipseg)
    pred.set_image(polyp_image)
    first = pred.predict("polyp")
    pred.predict("red tissue")
    pred.predict(["polyp", "mucosa"])
    assert len(calls) == 1
    pred.set_image(polyp_image[::-1])
    assert len(calls) == 2
    assert first.probs.shape == (1, 256, 256)


@pytest.mark.parametrize("shape, dtype", [
    ((16, 16), np.uint8), ((300, 120), np.uint16), ((97, 203, 3), np.float32), ((64, 80, 4), np.uint8),
    ((50, 60), np.int16), ((4096, 4096), np.uint16),
])
def test_any_size_and_dtype(clipseg, shape, dtype):
    rng = np.random.default_rng(0)
    image = (rng.random(shape) * (1 if dtype == np.float32 else 1000)).astype(dtype)
    pred = Predictor(clipseg)
    pred.set_image(image)
    out = pred.predict(["polyp", "vessel"])
    assert out.probs.shape == (2, *shape[:2]) and out.probs.dtype == np.float32
    assert out.masks.dtype == bool and out.labels.shape == shape[:2]
    assert set(np.unique(out.labels)) <= {0, 1, 2}


def test_labels_pick_the_most_likely_prompt_above_threshold(clipseg, polyp_image):
    pred = Predictor(clipseg)
    pred.set_image(polyp_image)
    out = pred.predict(["polyp", "a red thing"])
    best = out.probs.argmax(0) + 1
    expected = np.where(out.probs.max(0) >= 0.5, best, 0)
    np.testing.assert_array_equal(out.labels, expected)
    assert out.labels.max() > 0


@pytest.mark.parametrize("prompts", ["", "   ", [], ["polyp", ""]])
def test_empty_prompts_are_refused(clipseg, polyp_image, prompts):
    pred = Predictor(clipseg)
    pred.set_image(polyp_image)
    with pytest.raises(ValueError, match="prompt is empty"):
        pred.predict(prompts)


def test_predict_before_set_image(tiny_unet):
    with pytest.raises(RuntimeError, match="set_image"):
        Predictor(load_model(tiny_unet, device="cpu")).predict("polyp")
    with pytest.raises(TypeError, match="Predictor needs a model backend, such as load_model"):
        Predictor(None)


@pytest.mark.parametrize("which", ["tiny_clipseg", "tiny_unet"])
def test_batch_equals_one_by_one(request, which, polyp_image):
    backend = load_model(request.getfixturevalue(which), device="cpu")
    pred = Predictor(backend)
    images = [polyp_image, polyp_image[:200, :180], np.ascontiguousarray(polyp_image[..., 0])]
    batch = pred.predict_batch(images, ["polyp", "vessel"])
    for image, got in zip(images, batch):
        pred.set_image(image)
        np.testing.assert_allclose(got.probs, pred.predict(["polyp", "vessel"]).probs, atol=1e-5)


def test_masks_and_labels_follow_the_threshold_given(clipseg, polyp_image):
    pred = Predictor(clipseg)
    pred.set_image(polyp_image)
    probs = pred.predict(["polyp", "mucosa"]).probs
    lo, hi = np.quantile(probs, [0.3, 0.7])
    for t in (lo, hi):
        out = pred.predict(["polyp", "mucosa"], threshold=t)
        np.testing.assert_array_equal(out.masks, probs >= t)
        assert ((out.labels > 0) == (probs.max(0) >= t)).all()
    assert pred.predict("polyp", threshold=lo).masks.sum() > pred.predict("polyp", threshold=hi).masks.sum()


@pytest.fixture(scope="module")
def mirrored_unet(tmp_path_factory):
    """A tiny random FiLM-UNet whose config asks for flip averaging, saved and reloaded."""
    from napari_vlsm.core.models.random_models import build_random_film_unet

    from .conftest import TINY_UNET

    return build_random_film_unet(tmp_path_factory.mktemp("models") / "mirrored", flip_average=True, **TINY_UNET)


def test_flip_average_makes_the_answer_mirror_with_the_image(mirrored_unet, polyp_image):
    backend = load_model(mirrored_unet, device="cpu")
    assert backend.flip_average
    averaged, single = Predictor(backend), Predictor(backend, flip_average=False)
    mirror = np.ascontiguousarray(polyp_image[:, ::-1])
    out = {}
    for name, pred in (("averaged", averaged), ("single", single)):
        for key, image in (("image", polyp_image), ("mirror", mirror)):
            pred.set_image(image)
            out[name, key] = pred.predict(["polyp", "mucosa"]).probs
    # a mirrored frame gets the mirrored answer, which a random model alone does not give
    np.testing.assert_allclose(out["averaged", "mirror"], out["averaged", "image"][..., ::-1], atol=1e-5)
    assert np.abs(out["single", "mirror"] - out["single", "image"][..., ::-1]).max() > 1e-3
    # and the average is of the two views: the mean of the single view's logits on both
    logit = lambda p: np.log(p) - np.log1p(-p)  # noqa: E731
    expected = 1 / (1 + np.exp(-(logit(out["single", "image"]) + logit(out["single", "mirror"])[..., ::-1]) / 2))
    np.testing.assert_allclose(out["averaged", "image"], expected, atol=2e-3)
    batch = averaged.predict_batch([polyp_image, mirror], ["polyp", "mucosa"])
    np.testing.assert_allclose(batch[0].probs, out["averaged", "image"], atol=1e-5)


def test_a_probability_exactly_at_the_threshold_is_the_prompts_for_the_predictor_and_the_slider(
        clipseg, polyp_image):
    """The predictor's masks and labels, and the slider's new threshold on the same
    probabilities (the segmentation dock's re-thresholding of one prompt), agree pixel for
    pixel when the threshold is exactly one of the probabilities: at the threshold is in."""
    from napari_vlsm.core.images.threshold import binarize
    from napari_vlsm.plugin import label_writing

    pred = Predictor(clipseg)
    pred.set_image(polyp_image)
    probs = pred.predict("polyp").probs
    at = float(np.sort(probs, axis=None)[probs.size // 2])  # one of the probabilities (float32 -> float64: exact)
    on = probs[0] == at
    assert on.any() and (probs[0] < at).any() and (probs[0] > at).any()
    result = pred.predict("polyp", threshold=at)
    assert result.masks[0][on].all() and not result.masks[0][probs[0] < at].any()
    np.testing.assert_array_equal(result.labels, result.masks[0].astype(np.uint8))
    np.testing.assert_array_equal(binarize(probs, at), result.masks)
    write = label_writing.LabelWrite(layer=None, index=(), mode="replace", values=[1], before=np.zeros_like(
        result.labels), dtype=np.dtype(np.uint8), written=b"")
    planned, _ = label_writing.plan_threshold(write, probs, at)  # what the slider writes at that threshold
    np.testing.assert_array_equal(planned, result.labels)
    # two prompts: a pixel whose most likely prompt is exactly at the threshold takes that prompt
    two = pred.predict(["polyp", "polyp"], threshold=at)
    assert (two.labels[on] == 1).all() and (two.labels[probs[0] < at] == 0).all()


def test_prompts_that_differ_only_in_spaces_get_their_own_embeddings_through_the_cache(clipseg):
    """"polyp border" and "polypborder" tokenize differently, so the text cache keeps each
    prompt's own embedding, asked together or one after the other in either order."""
    own = {p: clipseg.encode_text([p])[0] for p in ("polyp border", "polypborder")}
    assert (own["polyp border"] - own["polypborder"]).abs().max() > 1e-4
    for order in (["polyp border", "polypborder"], ["polypborder", "polyp border"]):
        pred = Predictor(clipseg)
        for p in order:  # one after the other: the second is not answered from the first's entry
            torch.testing.assert_close(pred.text_embeddings([p])[0], own[p], atol=1e-5, rtol=0)
        together = Predictor(clipseg).text_embeddings(order)
        for k, p in enumerate(order):
            torch.testing.assert_close(together[k], own[p], atol=1e-5, rtol=0)
