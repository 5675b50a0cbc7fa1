"""The prompts stage: captions (a tiny BLIP, a captions file, COCO's) + each image's class names."""
import json

import pytest
from omegaconf import OmegaConf

from dsdiff.data.classes import COCO_CLASSES, VOC_CLASSES, class_words
from dsdiff.diffusion.prompts import read_jsonl
from dsdiff.prompting.captioner import clean_caption
from dsdiff.prompting.stage import ensure_prompts
from dsdiff.testing.tiny_blip import save_tiny_blip
from dsdiff.utils.errors import ConfigError

PREFIXES = ["a photo of", "a picture of", "an image of"]


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    return save_tiny_blip(tmp_path_factory.mktemp("blip") / "blip")


def stage_cfg(tmp_path, class_list="voc", root="", **prompts):
    base = OmegaConf.load(__import__("dsdiff.chain.config", fromlist=["config_dir"]).config_dir() / "prompts" / "default.yaml")
    base.dir = str(tmp_path / "prompts")
    base.source = "captions"
    return OmegaConf.create({"data": {"class_list": class_list}, "paths": {class_list: str(root)},
                             "prompts": OmegaConf.merge(base, prompts)})


def words(class_ids, names=VOC_CLASSES):
    return " ".join(class_words(names[c]) for c in class_ids)


class FakeCaptioner:
    """Returns ``text`` for every image; raises on call number ``fail_at``; records what it captioned."""

    def __init__(self, text="", fail_at=None):
        self.text, self.fail_at, self.calls, self.seen = text, fail_at, 0, []

    def __call__(self, images, prefix):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("captioner died")
        self.seen.append(len(images))
        return [clean_caption(f"{prefix} {self.text}", prefix) for _ in images]


def test_voc_images_get_one_caption_per_prefix_with_their_mask_classes(tmp_path, voc_expected, tiny_blip):
    cfg = stage_cfg(tmp_path, root=voc_expected["root"], captioner=str(tiny_blip), batch_size=4)
    out = ensure_prompts(cfg)
    records = read_jsonl(out)
    train = voc_expected["splits"]["train"]
    assert len(records) == len(train) * len(PREFIXES)
    # interleaved: every image's first caption before any second one
    assert [r.image_id for r in records[: len(train)]] == sorted(train)
    for r in records:
        labels = voc_expected["labels"][r.image_id]
        assert r.class_ids == labels
        assert r.prompt == f"{r.caption}; {words(labels)}"  # random weights: junk, but a valid record
        assert r.caption.startswith(PREFIXES[int(r.id.rsplit('_', 1)[1])])
        assert ";" not in r.caption
    # finished: prompts + settings + the captions, no partial file left
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(
        [out.name, out.stem + ".json", out.stem + ".captions.jsonl"])
    assert json.loads(out.with_suffix(".json").read_text())["prefixes"] == PREFIXES


def test_empty_captions_fall_back_to_the_prefix(tmp_path, voc_expected):
    assert clean_caption("  a photo of  ", "a photo of") == "a photo of"
    assert clean_caption("a dog; a cat .", "a photo of") == "a dog, a cat"
    cfg = stage_cfg(tmp_path, root=voc_expected["root"], prefixes=["a photo of"])
    records = read_jsonl(ensure_prompts(cfg, load_captioner=lambda: FakeCaptioner("")))
    first = voc_expected["splits"]["train"][0]
    (r,) = [r for r in records if r.image_id == first]
    assert r.prompt == f"a photo of; {words(voc_expected['labels'][first])}"


def test_a_crash_mid_captioning_keeps_finished_images(tmp_path, voc_expected, monkeypatch):
    cfg = stage_cfg(tmp_path, root=voc_expected["root"], batch_size=2)
    first = FakeCaptioner("run one", fail_at=len(PREFIXES) + 1)  # dies on the second batch
    with pytest.raises(RuntimeError, match="captioner died"):
        ensure_prompts(cfg, load_captioner=lambda: first)
    (partial,) = (tmp_path / "prompts").glob("*.captions.partial.jsonl")
    assert not list((tmp_path / "prompts").glob("*-captions-????????????.jsonl"))  # no prompts file yet
    with partial.open("a") as f:
        f.write('{"image": "2007_0000')  # a line cut short by a kill
    second = FakeCaptioner("run two")
    records = read_jsonl(ensure_prompts(cfg, load_captioner=lambda: second))
    train = sorted(voc_expected["splits"]["train"])
    assert sum(second.seen) == (len(train) - 2) * len(PREFIXES)  # only the four unfinished images
    by_image = {r.image_id: r.caption for r in records if r.id.endswith("_0")}
    assert [by_image[i] for i in train] == ["a photo of run one"] * 2 + ["a photo of run two"] * 4
    assert not partial.exists()
    # a third run reuses the finished file without loading a captioner or reading the dataset
    monkeypatch.setattr("dsdiff.prompting.stage._mask_images", lambda *a: pytest.fail("read the dataset again"))
    assert read_jsonl(ensure_prompts(cfg, load_captioner=lambda: pytest.fail("recaptioned"))) == records


def test_other_settings_build_their_own_file_and_a_mismatched_cache_is_refused(tmp_path, voc_expected):
    cfg = stage_cfg(tmp_path, root=voc_expected["root"])
    a = ensure_prompts(cfg, load_captioner=lambda: FakeCaptioner("x"))
    b = ensure_prompts(stage_cfg(tmp_path, root=voc_expected["root"], prefixes=["a photo of"]),
                       load_captioner=lambda: FakeCaptioner("y"))
    assert a != b and len(read_jsonl(b)) * 3 == len(read_jsonl(a))
    meta = a.with_suffix(".json")
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "max_new_tokens": 5}))
    with pytest.raises(ValueError, match="other prompts settings \\(max_new_tokens\\)"):
        ensure_prompts(cfg)


@pytest.mark.parametrize("captioner", ["missing_folder", "nobody/no-such-blip"])
def test_a_missing_captioner_stops_before_anything_is_written(tmp_path, voc_expected, captioner):
    name = str(tmp_path / captioner) if captioner == "missing_folder" else captioner
    cfg = stage_cfg(tmp_path, root=voc_expected["root"], captioner=name)
    with pytest.raises(ConfigError, match="prompts.captioner=.*prompts.captions="):
        ensure_prompts(cfg)
    assert not (tmp_path / "prompts").exists()


def test_malformed_jsonl_lines_are_named_by_file_and_line(tmp_path, voc_expected):
    from dsdiff.synthetic.spec import prompt_records

    train = voc_expected["splits"]["train"]
    captions = tmp_path / "caps.jsonl"
    captions.write_text(json.dumps({"image": train[0], "caption": "ok"}) + "\n\n" + '{"image": "x", "caption": \n')
    cfg = stage_cfg(tmp_path, root=voc_expected["root"], captions=str(captions))
    with pytest.raises(ValueError, match=r"caps\.jsonl:3: not valid JSON"):
        ensure_prompts(cfg)
    assert not (tmp_path / "prompts").exists()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "a dog; dog", "class_ids": [12]}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2: expected a JSON object"):
        prompt_records(prompts, VOC_CLASSES)
    prompts.write_text('{"id": "a", "prompt": "a dog; dog", "class_ids": [12]}\n{"prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2: .*lacks"):
        prompt_records(prompts, VOC_CLASSES)


def test_a_given_captions_file_needs_no_captioner(tmp_path, voc_expected):
    first, *rest = voc_expected["splits"]["train"]
    captions = tmp_path / "caps.jsonl"
    captions.write_text(json.dumps({"image": f"{first}.jpg", "caption": ["two things.", "a scene"]}) + "\n")
    cfg = stage_cfg(tmp_path, root=voc_expected["root"], captions=str(captions))
    records = read_jsonl(ensure_prompts(cfg, load_captioner=lambda: pytest.fail("loaded a captioner")))
    labels = voc_expected["labels"]
    assert [r.prompt for r in records if r.image_id == first] == [f"two things; {words(labels[first])}",
                                                                  f"a scene; {words(labels[first])}"]
    for name in rest:  # not in the captions file: a class template
        assert [r.prompt for r in records if r.image_id == name] == [f"a photo of {_articles(labels[name])}; {words(labels[name])}"]


def _articles(ids):
    return " and ".join(f"{'an' if w[0] in 'aeiou' else 'a'} {w}" for w in (class_words(VOC_CLASSES[c]) for c in ids))


def test_coco_prompts_are_its_train_captions_with_instance_classes(tmp_path, coco_expected):
    cfg = stage_cfg(tmp_path, class_list="coco", root=coco_expected["root"])
    records = read_jsonl(ensure_prompts(cfg, load_captioner=lambda: pytest.fail("COCO needs no captioner")))
    labels, captions = coco_expected["labels"]["train"], coco_expected["captions"]["train"]
    with_classes = {n for n, ids in labels.items() if ids}
    assert {r.image_id for r in records} == with_classes and len(records) == 2 * len(with_classes)
    for r in records:
        assert r.class_ids == labels[r.image_id]
        assert r.caption in captions[r.image_id]
        assert r.prompt == f"{r.caption.rstrip('.')}; {words(r.class_ids, COCO_CLASSES)}"
    missing = stage_cfg(tmp_path, class_list="coco", root=tmp_path / "no_coco")
    with pytest.raises(FileNotFoundError, match="prompts.captions="):
        ensure_prompts(missing)


def test_templates_and_bad_settings(tmp_path, voc_expected, make_cfg):
    assert ensure_prompts(stage_cfg(tmp_path, source="templates")) is None
    with pytest.raises(ValueError, match="prompts.source='blip'"):
        ensure_prompts(stage_cfg(tmp_path, source="blip"))
    with pytest.raises(ValueError, match="data.class_list='shapes'"):
        ensure_prompts(stage_cfg(tmp_path, class_list="shapes"))
    with pytest.raises(ValueError, match="prompts.per_image=4 but prompts.prefixes has 3"):
        ensure_prompts(stage_cfg(tmp_path, root=voc_expected["root"], per_image=4))
    assert not (tmp_path / "prompts").exists()
    # the paper's recipes caption by default; the shapes world keeps its templates
    assert make_cfg(["+experiment=voc_deeplab"]).prompts.source == "captions"
    assert make_cfg(["+experiment=coco_deeplab"]).prompts.source == "captions"
    shapes = make_cfg(["+experiment=shapes_deeplab"])
    assert shapes.prompts.source == "templates" and ensure_prompts(shapes) is None


def test_a_partial_file_cut_anywhere_resumes_into_valid_lines(tmp_path, voc_expected):
    from dsdiff.prompting.captioner import caption_images

    images = {n: voc_expected["root"] / "JPEGImages" / f"{n}.jpg" for n in voc_expected["splits"]["train"][:3]}
    first, second, third = images
    for tail in ("", '{"image": "x", "capt'):  # cut right after a whole line's JSON, or inside a line
        partial = tmp_path / f"cut{len(tail)}.partial.jsonl"
        partial.write_text(json.dumps({"image": first, "caption": ["kept"]}) + ("\n" + tail if tail else ""))
        done = caption_images(images, ["a photo of"], partial, lambda: FakeCaptioner("new"))
        assert done == {first: ["kept"], second: ["a photo of new"], third: ["a photo of new"]}
        rows = [json.loads(line) for line in partial.read_text().splitlines()]
        assert [r["image"] for r in rows] == [first, second, third]


def test_generate_with_a_missing_captioner_writes_nothing(make_cfg, tmp_path, voc_expected):
    from dsdiff.generate import generate
    from dsdiff.testing.tiny_sd import save_tiny_pipeline

    # a loadable generator, so that the captioner is what is missing (the generator is checked first)
    tiny_sd = save_tiny_pipeline(tmp_path / "tiny_sd")
    cfg = make_cfg(["+experiment=voc_deeplab", "debug=fast", f"paths.voc={voc_expected['root']}", f"generator.model={tiny_sd}",
                    f"paths.data_dir={tmp_path / 'data'}", f"synthetic.dir={tmp_path / 'syn'}",
                    f"prompts.captioner={tmp_path / 'no_blip'}", "synthetic.num_images=2"], output_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match="prompts.captioner=.*no_blip.*prompts.captions="):
        generate(cfg)
    assert not (tmp_path / "syn").exists() and not (tmp_path / "data").exists()
