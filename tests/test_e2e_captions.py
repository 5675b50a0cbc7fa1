"""End to end with the paper's prompts: captions of the dataset's train images + their class names
-> tiny Stable Diffusion -> train -> self-train -> test, offline (a tiny BLIP, tiny fixtures)."""
import json

import pytest

from dsdiff.data.classes import COCO_CLASSES, VOC_CLASSES, class_words
from dsdiff.testing.tiny_blip import save_tiny_blip
from dsdiff.testing.tiny_sd import save_tiny_pipeline
from dsdiff.train import train

# tiny generation and training, whatever debug=fast sets (other overrides may change it)
TINY = ["debug=fast", "synthetic.num_images=6", "generator.num_inference_steps=2", "generator.batch_size=3",
        "synthetic.filters.drop_empty=false", "trainer.max_steps=2", "trainer.val_check_interval=1"]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("e2e_sd") / "pipeline")


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    return save_tiny_blip(tmp_path_factory.mktemp("e2e_blip") / "blip")


def _manifest(synthetic_dir):
    return [json.loads(line) for line in (synthetic_dir / "manifest.jsonl").read_text().splitlines() if line.strip()]


def _assert_protocol_metrics(run):
    """metrics.json: the tune split's curve, the test split once (plain + TTA), and the final weights tested."""
    saved = json.loads((run / "metrics.json").read_text())
    for key in ("tune/mIoU", "test/mIoU", "test/mIoU_tta"):
        assert 0 <= saved[key] <= 1, key
    assert saved["ckpt"] == "last" and saved["ckpt_path"] == str(run / "selftrain_1" / "checkpoints" / "last.ckpt")


def _class_part(ids, names):
    return "; " + " ".join(class_words(names[c]) for c in ids)


def test_voc_deeplab_generates_from_blip_captions_with_class_names(make_cfg, tmp_path, voc_expected, tiny_sd, tiny_blip):
    syn = tmp_path / "syn"
    cfg = make_cfg(["+experiment=voc_deeplab", *TINY, f"paths.voc={voc_expected['root']}", f"paths.data_dir={tmp_path / 'data'}",
                    f"generator.model={tiny_sd}", f"prompts.captioner={tiny_blip}", f"synthetic.dir={syn}"],
                   output_dir=tmp_path / "run")
    train(cfg)
    samples = _manifest(syn)
    assert len(samples) == 6
    # the first six prompt records: each train image's first ("a photo of") caption
    assert sorted(s["image_id"] for s in samples) == sorted(voc_expected["splits"]["train"])
    for s in samples:
        labels = voc_expected["labels"][s["image_id"]]
        assert s["prompt"].startswith("a photo of") and s["prompt"].endswith(_class_part(labels, VOC_CLASSES))
        assert s["class_ids"] == labels
    (prompts,) = (tmp_path / "data" / "prompts").glob("voc-captions-*[0-9a-f].jsonl")
    assert len(prompts.read_text().splitlines()) == 6 * 3  # one caption per prefix
    _assert_protocol_metrics(tmp_path / "run")


def test_coco_deeplab_generates_from_coco_train_captions(make_cfg, tmp_path, coco_expected, tiny_sd):
    syn = tmp_path / "syn"
    cfg = make_cfg(["+experiment=coco_deeplab", *TINY, f"paths.coco={coco_expected['root']}", f"paths.data_dir={tmp_path / 'data'}",
                    f"generator.model={tiny_sd}", "prompts.captioner=nobody/no-blip-needed", f"synthetic.dir={syn}"],
                   output_dir=tmp_path / "run")
    train(cfg)
    samples = _manifest(syn)
    labels, captions = coco_expected["labels"]["train"], coco_expected["captions"]["train"]
    assert len(samples) == 6 and {s["image_id"] for s in samples} == {n for n, ids in labels.items() if ids}
    for s in samples:
        caption, classes = s["prompt"].split("; ")
        assert caption + "." in captions[s["image_id"]]
        assert "; " + classes == _class_part(labels[s["image_id"]], COCO_CLASSES)
    _assert_protocol_metrics(tmp_path / "run")


def test_on_the_fly_stream_uses_the_prompts_stage_too(make_cfg, tmp_path, voc_expected, tiny_sd, tiny_blip):
    """synthetic.mode=on_the_fly must not fall back to class templates when the experiment asks for captions."""
    import hydra

    from dsdiff.train import on_the_fly_prompts

    cfg = make_cfg(["+experiment=voc_deeplab", *TINY, f"paths.voc={voc_expected['root']}", f"paths.data_dir={tmp_path / 'data'}",
                    f"generator.model={tiny_sd}", f"prompts.captioner={tiny_blip}", "synthetic.mode=on_the_fly"],
                   output_dir=tmp_path / "run")
    on_the_fly_prompts(cfg)
    stream = hydra.utils.instantiate(cfg.data.train)(transform=None)
    assert len(stream.plan.records) == 6 * 3  # every train image, one caption per prefix
    for r in stream.plan.records:
        labels = voc_expected["labels"][r.image_id]
        assert r.prompt.endswith(_class_part(labels, VOC_CLASSES))
