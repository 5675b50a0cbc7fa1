"""Where generation's prompt records come from: a prompts JSONL, or class templates."""
import pytest

from dsdiff.data.classes import SHAPES_CLASSES, VOC_CLASSES
from dsdiff.diffusion.prompts import PromptRecord, write_jsonl
from dsdiff.synthetic.predict import GenerationRequests
from dsdiff.synthetic.spec import GenerationPlan, prompt_records


def test_templates_name_each_class_then_each_ordered_pair():
    singles = prompt_records(None, VOC_CLASSES)
    assert len(singles) == 20 and singles[10].prompt == "a photo of a dining table" and singles[10].class_ids == [11]
    pairs = prompt_records(None, SHAPES_CLASSES, "{}", max_classes=2)
    assert len(pairs) == 5 + 5 * 4
    assert {r.prompt for r in pairs} >= {"a ball", "a ball and a leaf", "a leaf and a ball"}
    assert all(len(set(r.class_ids)) == len(r.class_ids) for r in pairs)


def test_prompts_file_is_read_and_checked_against_the_class_list(tmp_path):
    path = write_jsonl([PromptRecord("a", "a dog on a sofa; dog sofa", [12, 18])], tmp_path / "p.jsonl")
    assert prompt_records(path, VOC_CLASSES)[0].class_ids == [12, 18]
    with pytest.raises(ValueError, match="outside this 6-class list"):
        prompt_records(path, SHAPES_CLASSES)
    with pytest.raises(FileNotFoundError, match="python -m dsdiff.prompts"):
        prompt_records(tmp_path / "missing.jsonl", VOC_CLASSES)


def test_sample_i_uses_record_i_mod_r_and_seed_plus_i():
    records = prompt_records(None, SHAPES_CLASSES, "{}")
    plan = GenerationPlan({"model": None}, {"seed": 100}, SHAPES_CLASSES, records)
    requests = [r for group in GenerationRequests(plan, [[0, 6], [12]]) for r in group]
    assert [(r["id"], r["seed"], r["record"]["class_ids"]) for r in requests] == [
        ("0000000", 100, [1]), ("0000006", 106, [2]), ("0000012", 112, [3])]


def test_dataset_config_changes_with_what_changes_the_samples():
    records = prompt_records(None, SHAPES_CLASSES, "{}")
    gen = {"model": "m", "labels": {"tau": 4}, "batch_size": 4, "dtype": "auto"}

    def dataset_config(generator, synthetic, class_names, records):
        return GenerationPlan(generator, synthetic, class_names, records).dataset_config()

    syn = {"seed": 0, "template": "{}", "num_images": 10, "dir": "/x"}
    base = dataset_config(gen, syn, SHAPES_CLASSES, records)
    assert dataset_config(gen, {**syn, "num_images": 99, "dir": "/y"}, SHAPES_CLASSES, records) == base
    # the batch size decides which ids share a forward pass, which changes the last bits
    assert dataset_config({**gen, "batch_size": 1}, syn, SHAPES_CLASSES, records) != base
    assert dataset_config({**gen, "labels": {"tau": 2}}, syn, SHAPES_CLASSES, records) != base
    assert dataset_config(gen, {**syn, "seed": 1}, SHAPES_CLASSES, records) != base
    assert dataset_config(gen, syn, SHAPES_CLASSES, records[:3]) != base
