"""`python -m dsdiff.prompts`: a dataset folder (or a labels file) + captions -> a prompts JSONL."""
import json
import subprocess
import sys

import pytest

from dsdiff.data.classes import VOC_CLASSES, class_words
from dsdiff.diffusion.prompts import read_jsonl
from dsdiff.prompts import main


def test_voc_folder_with_captions(voc_expected, tmp_path):
    ids = voc_expected["splits"]["train"]
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"image": f"{ids[0]}.jpg", "caption": ["a photo of things", "more things"]}) + "\n")
    out = main(["--dataset", "voc", "--root", str(voc_expected["root"]), "--split", "train",
                "--captions", str(captions), "--out", str(tmp_path / "p.jsonl")])
    records = read_jsonl(out)
    by_image = {}
    for r in records:
        by_image.setdefault(r.image_id, []).append(r)
    assert set(by_image) == set(ids)
    first = by_image[ids[0]]
    words = [class_words(VOC_CLASSES[c]) for c in voc_expected["labels"][ids[0]]]
    assert [r.prompt for r in first] == [f"a photo of things; {' '.join(words)}", f"more things; {' '.join(words)}"]
    for image_id in ids[1:]:  # no captions: one class template each
        (r,) = by_image[image_id]
        assert r.class_ids == voc_expected["labels"][image_id] and r.prompt.startswith("a photo of a")


def test_coco_folder_with_coco_captions_json(coco_expected, tmp_path):
    labels = coco_expected["labels"]["train"]
    name = next(n for n, ids in labels.items() if ids)
    captions = tmp_path / "captions_train2017.json"
    captions.write_text(json.dumps({
        "images": [{"id": int(name), "file_name": f"{name}.jpg"}],
        "annotations": [{"image_id": int(name), "caption": "Things on a table."}],
    }))
    out = main(["--dataset", "coco", "--root", str(coco_expected["root"]), "--captions", str(captions),
                "--out", str(tmp_path / "coco.jsonl")])
    records = {r.image_id: r for r in read_jsonl(out)}
    assert set(records) == {n for n, ids in labels.items() if ids}
    assert records[name].caption == "Things on a table." and records[name].class_ids == labels[name]


def test_labels_file_and_tokenizer_truncation(tmp_path, tiny_pipeline_dir):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"img1": [12, 18]}))
    captions = tmp_path / "caps.txt"
    captions.write_text("img1\t" + "a dog sitting on the grass " * 30 + "\n")
    out = main(["--labels", str(labels), "--classes", "voc", "--captions", str(captions),
                "--tokenizer", str(tiny_pipeline_dir), "--out", str(tmp_path / "p.jsonl")])
    (record,) = read_jsonl(out)
    assert record.prompt.endswith("; dog sofa") and record.prompt.startswith("a dog sitting")
    assert record.prompt.count("grass") < 30


def test_help_and_argument_errors(tmp_path):
    help_text = subprocess.run([sys.executable, "-m", "dsdiff.prompts", "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "--captions" in help_text.stdout and "examples:" in help_text.stdout
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x.jsonl")])  # neither --dataset nor --labels


def test_captioner_option_captions_a_voc_folder_and_resumes_only_with_the_same_settings(voc_expected, tmp_path):
    from dsdiff.testing.tiny_blip import save_tiny_blip

    blip = save_tiny_blip(tmp_path / "blip")
    out = tmp_path / "prompts" / "voc_blip.jsonl"
    args = ["--dataset", "voc", "--root", str(voc_expected["root"]), "--captioner", str(blip), "--out", str(out),
            "--batch-size", "4", "--device", "cpu"]
    records = read_jsonl(main([*args, "--prefixes", "a photo of", "a picture of"]))
    assert len(records) == 2 * len(voc_expected["splits"]["train"])
    for r in records:
        words = " ".join(class_words(VOC_CLASSES[c]) for c in voc_expected["labels"][r.image_id])
        assert r.prompt.endswith(f"; {words}") and r.caption.startswith(("a photo of", "a picture of"))
    assert (tmp_path / "prompts" / "voc_blip.captions.jsonl").is_file()  # the captions, reusable with --captions
    with pytest.raises(ValueError, match="other prompts settings \\(prefixes\\)"):
        main([*args, "--prefixes", "an image of"])
    with pytest.raises(SystemExit):
        main([*args, "--captions", str(out)])  # --captioner with a captions file: ambiguous


def test_console_script_exits_zero_on_success(voc_expected, tmp_path):
    """`dsdiff-prompts` runs `sys.exit(<its target>())`: a returned path would exit with status 1."""
    import subprocess
    import sys
    import tomllib
    from pathlib import Path

    module, func = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]["scripts"]["dsdiff-prompts"].split(":")
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"image": f"{voc_expected['splits']['train'][0]}.jpg", "caption": "a photo of things"}) + "\n")
    code = (f"import sys; sys.argv = ['dsdiff-prompts', '--dataset', 'voc', '--root', {str(voc_expected['root'])!r}, "
            f"'--split', 'train', '--captions', {str(captions)!r}, '--out', {str(tmp_path / 'p.jsonl')!r}]; "
            f"from {module} import {func}; sys.exit({func}())")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
    assert (tmp_path / "p.jsonl").is_file()
