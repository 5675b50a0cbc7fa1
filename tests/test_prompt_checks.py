"""The prompts and captions files a user passes are checked before anything is generated or written:
a prompts record that cannot be generated is named as FILE:LINE, a captions file that matches none of
the dataset's images is refused, one that covers fewer than half is warned about, and the
`python -m dsdiff.prompts` command names its own flags."""
import json
import logging
import os
import subprocess
import sys

import pytest

from dsdiff.data.classes import VOC_CLASSES
from dsdiff.diffusion.prompts import read_jsonl
from dsdiff.prompts import run as prompts_cli
from dsdiff.utils.errors import SettingError

GOOD = {"id": "a", "prompt": "a photo of a dog; dog", "class_ids": [12], "class_words": ["dog"]}
# (record on line 2, what the error says about it)
BAD = {
    "empty_prompt": ({"id": "b", "prompt": "", "class_ids": [12]}, "empty prompt ''"),
    "blank_prompt": ({"id": "b", "prompt": "   ", "class_ids": [12]}, "empty prompt '   '"),
    "no_classes": ({"id": "b", "prompt": "a street", "class_ids": []}, "synthetic.filters.drop_empty=true would drop"),
    "class_name_as_id": ({"id": "b", "prompt": "a dog", "class_ids": ["dog"]}, "class id 'dog' is not a class index (write 12"),
    "id_out_of_range": ({"id": "b", "prompt": "a thing", "class_ids": [21]}, "class id 21 is outside this 21-class list"),
    "background_id": ({"id": "b", "prompt": "a thing", "class_ids": [0]}, "class id 0 (the background"),
    "words_of_another_list": ({"id": "b", "prompt": "a unicorn", "class_ids": [12], "class_words": ["unicorn"]},
                              "\"class_words\" ['unicorn'] do not match \"class_ids\" [12], which this class list names ['dog']"),
}


def write_records(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from dsdiff.testing.tiny_sd import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipeline", image_size=32)


@pytest.fixture
def check(make_cfg, tiny_model, tmp_path):
    """``check(prompts_file, *overrides)``: generate's checks (no weights loaded) for that prompts file."""
    from dsdiff.generate import check_generation

    def _check(prompts, *extra):
        return check_generation(make_cfg(["+experiment=voc_deeplab", "trainer=cpu", f"generator.model={tiny_model}",
                                          f"synthetic.dir={tmp_path / 'syn'}", "synthetic.num_images=2",
                                          f"synthetic.prompts={prompts}", *extra]))
    return _check


@pytest.mark.parametrize("case", list(BAD))
def test_a_record_that_cannot_be_generated_is_named_as_file_line(check, tmp_path, case):
    record, says = BAD[case]
    prompts = write_records(tmp_path / "p.jsonl", [GOOD, record, GOOD])
    with pytest.raises(SettingError) as error:
        check(prompts)
    text = str(error.value)
    assert f"{prompts}: 1 of 3 records cannot be generated" in text
    assert f"{prompts}:2: " in text and says in text and f"{prompts}:1:" not in text and f"{prompts}:3:" not in text
    assert "fix: " in text
    assert not (tmp_path / "syn").exists()  # before the output folder is made


def test_an_empty_class_list_is_refused_only_when_drop_empty_would_drop_it(check, tmp_path):
    prompts = write_records(tmp_path / "p.jsonl", [{"id": str(i), "prompt": "a street", "class_ids": []} for i in range(3)])
    with pytest.raises(SettingError, match=r"p\.jsonl:3: .*drop_empty=true.*\nfix: .*drop_empty=false"):
        check(prompts)
    assert list(check(prompts, "synthetic.filters.drop_empty=false")) == list(VOC_CLASSES)  # all-background images are wanted


def test_many_bad_records_list_five_and_count_the_rest(check, tmp_path):
    prompts = write_records(tmp_path / "p.jsonl", [GOOD] + [{"id": str(i), "prompt": "", "class_ids": [12]} for i in range(8)])
    with pytest.raises(SettingError) as error:
        check(prompts)
    text = str(error.value)
    assert "8 of 9 records cannot be generated" in text
    assert [f"{prompts}:{n}:" in text for n in range(2, 10)] == [True] * 5 + [False] * 3
    assert "... and 3 more (lines 7, 8, 9)" in text


def test_a_missing_prompts_file_is_refused_before_the_run_writes(check, tmp_path):
    with pytest.raises(FileNotFoundError, match="no prompts file at .*nope.jsonl: make one with `python -m dsdiff.prompts`"):
        check(tmp_path / "nope.jsonl")
    assert not (tmp_path / "syn").exists()


def test_generate_exits_2_on_an_empty_prompt_and_writes_nothing(tiny_model, tmp_path):
    prompts = write_records(tmp_path / "p.jsonl", [GOOD, BAD["empty_prompt"][0]])
    syn, run_dir = tmp_path / "syn", tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, "-m", "dsdiff.generate", "+experiment=voc_deeplab", "debug=fast", "trainer=cpu",
                           f"generator.model={tiny_model}", "synthetic.num_images=2", f"synthetic.dir={syn}",
                           f"synthetic.prompts={prompts}", f"hydra.run.dir={run_dir}"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"dsdiff: error: prompts file {prompts}: 1 of 2 records cannot be generated" in proc.stderr
    assert f"{prompts}:2: empty prompt ''" in proc.stderr and "Traceback" not in proc.stderr
    assert not syn.exists()
    assert not [p for p in run_dir.rglob("*") if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"]


def test_reading_a_prompts_file_refuses_an_empty_prompt(tmp_path):
    # what training with on-the-fly synthetic data reads, too
    prompts = write_records(tmp_path / "p.jsonl", [GOOD, GOOD, BAD["blank_prompt"][0]])
    with pytest.raises(SettingError, match=r"p\.jsonl:3: empty prompt '   '"):
        read_jsonl(prompts)


# ---- captions coverage -------------------------------------------------------------------------

def captions_file(path, images):
    path.write_text("".join(json.dumps({"image": f"{name}.jpg", "caption": "a scene"}) + "\n" for name in images))
    return path


def test_captions_matching_no_image_are_refused_with_an_example_of_each_key(voc_expected, tmp_path, capsys):
    ids = voc_expected["splits"]["train"]
    captions = captions_file(tmp_path / "caps.jsonl", ["COCO_train2014_000000000042", "COCO_train2014_000000000043"])
    out = tmp_path / "p.jsonl"
    with pytest.raises(SystemExit) as stop:
        prompts_cli(["--dataset", "voc", "--root", str(voc_expected["root"]), "--captions", str(captions), "--out", str(out)])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert f"dsdiff: error: captions file {captions} matches none of the {len(ids)} images of {voc_expected['root']}" in err
    assert f"image {ids[0]!r}" in err and "'COCO_train2014_000000000042'" in err
    assert "leave out --captions" in err and "Traceback" not in err
    assert not out.exists()


def test_the_prompts_stage_refuses_captions_matching_no_image_before_writing(voc_expected, tmp_path):
    from omegaconf import OmegaConf

    from dsdiff.chain.config import config_dir
    from dsdiff.prompting.stage import ensure_prompts

    base = OmegaConf.load(config_dir() / "prompts" / "default.yaml")
    captions = captions_file(tmp_path / "caps.jsonl", ["img_1", "img_2"])
    prompts = OmegaConf.merge(base, {"source": "captions", "captions": str(captions), "dir": str(tmp_path / "prompts")})
    cfg = OmegaConf.create({"data": {"class_list": "voc"}, "paths": {"voc": str(voc_expected["root"])}, "prompts": prompts})
    with pytest.raises(SettingError, match=r"caps\.jsonl matches none of the 6 images .*first caption's image key is 'img_1'"
                                           r".*pass prompts\.source=templates"):
        ensure_prompts(cfg, load_captioner=lambda: pytest.fail("loaded a captioner"))
    assert not (tmp_path / "prompts").exists()


def test_captions_covering_fewer_than_half_warn_with_the_images_left_to_templates(voc_expected, tmp_path, caplog):
    ids = voc_expected["splits"]["train"]
    args = ["--dataset", "voc", "--root", str(voc_expected["root"]), "--out", str(tmp_path / "p.jsonl"), "--captions"]
    with caplog.at_level(logging.WARNING, logger="dsdiff.prompts"):
        prompts_cli([*args, str(captions_file(tmp_path / "few.jsonl", ids[:2]))])
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"covers 2 of the {len(ids)} images" in warning and f"the other {len(ids) - 2} fall back to class templates" in warning
    assert ids[2] in warning and ids[0] not in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dsdiff.prompts"):
        prompts_cli([*args, str(captions_file(tmp_path / "most.jsonl", ids[:3]))])  # half: no warning
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


# ---- the command names its own flags -------------------------------------------------------------

def test_an_unreachable_captioner_names_the_commands_flags_not_config_keys(voc_expected, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, "-m", "dsdiff.prompts", "--dataset", "voc", "--root", str(voc_expected["root"]),
                           "--captioner", "Salesforce/blip-image-captioning-large", "--out", str(tmp_path / "x.jsonl")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    first = next(line for line in proc.stderr.splitlines() if line.startswith("dsdiff: error:"))
    assert "--captioner=" in first and "--captions=" in first and "leave out --captioner" in first
    for key in ("prompts.captioner=", "prompts.captions=", "prompts.source="):
        assert key not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.jsonl").exists()
