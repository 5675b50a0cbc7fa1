"""Prompts: captions joined with labels, class-word mapping, token spans with a real BPE tokenizer."""
import json
import logging

import pytest

from dsdiff.data.classes import COCO_CLASSES, VOC_CLASSES
from dsdiff.diffusion.prompts import (
    PromptRecord,
    build_records,
    class_token_spans,
    count_tokens,
    find_class_ids,
    fit_prompt,
    load_captions,
    prompt_with_classes,
    read_jsonl,
    template_prompt,
    write_jsonl,
)

VOC = {name: i for i, name in enumerate(VOC_CLASSES)}


def test_prompt_appends_class_words():
    assert prompt_with_classes("A dog under a dining table.", ["dog", "dining table"]) == (
        "A dog under a dining table; dog dining table"
    )
    assert prompt_with_classes("a street", []) == "a street"
    assert template_prompt(["aeroplane", "dog"]) == "a photo of an aeroplane and a dog"


def test_records_join_captions_with_dataset_labels_and_map_class_names_to_words():
    labels = {
        "2007_000001": [VOC["diningtable"], VOC["pottedplant"]],
        "2007_000002": [VOC["tvmonitor"]],
        "2007_000003": [],  # background only: nothing to prompt
    }
    captions = [("2007_000001", "a room with a table"), ("2007_000001", "a plant on a table"), ("other", "x")]
    records = build_records(labels, VOC_CLASSES, captions, max_captions=1)
    assert [r.id for r in records] == ["2007_000001_0", "2007_000002_t"]
    first, templated = records
    assert first.prompt == "a room with a table; dining table potted plant"
    assert first.class_prompt == "dining table potted plant"
    assert first.class_ids == [VOC["diningtable"], VOC["pottedplant"]] and first.image_id == "2007_000001"
    assert templated.prompt == "a photo of a tv monitor; tv monitor" and templated.caption is None


def test_captions_without_image_get_the_classes_they_name():
    records = build_records({}, COCO_CLASSES, [(None, "A hot dog next to two cell phones"), (None, "clouds")])
    assert len(records) == 1
    assert [COCO_CLASSES[i] for i in records[0].class_ids] == ["hot dog", "cell phone"]  # not "dog"
    assert records[0].prompt.endswith("; hot dog cell phone")


def test_find_class_ids_matches_whole_words_and_plurals():
    assert find_class_ids("Two Dogs near a sofa", VOC_CLASSES) == [VOC["dog"], VOC["sofa"]]
    assert find_class_ids("a doghouse in a catalogue", VOC_CLASSES) == []


def test_load_captions_reads_coco_json_jsonl_and_text(tmp_path):
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({
        "images": [{"id": 391895, "file_name": "000000391895.jpg"}],
        "annotations": [{"image_id": 391895, "caption": " A man riding a bike. "}],
    }))
    assert load_captions(coco) == [("391895", "A man riding a bike.")]
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text('{"image": "2007_000032.jpg", "caption": ["a plane", "a jet"]}\n\n')
    assert load_captions(jsonl) == [("2007_000032", "a plane"), ("2007_000032", "a jet")]
    text = tmp_path / "captions.txt"
    text.write_text("2007_000032\ta plane on grass\na lone dog\n")
    assert load_captions(text) == [("2007_000032", "a plane on grass"), (None, "a lone dog")]
    # COCO ids written either way join with the dataset's names ("000000391895").
    records = build_records({"000000391895": [2]}, COCO_CLASSES, load_captions(coco))
    assert records[0].prompt == "A man riding a bike; bicycle"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"file": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_captions(bad)
    with pytest.raises(FileNotFoundError, match="--captions"):
        load_captions(tmp_path / "missing.json")


def test_spans_cover_every_sub_token_of_multi_token_names(tokenizer):
    words = ["dog", "dining table", "tv monitor", "person", "potted plant"]
    text, spans = class_token_spans(tokenizer, words)
    ids = tokenizer(text)["input_ids"]
    assert text == "dog dining table tv monitor person potted plant"
    assert spans[0] == [1]  # a one-token name right after the start token
    assert len(spans[1]) == 2  # "dining table": one token per word
    assert len(spans[2]) >= 6  # "tv monitor" is not in the tiny vocabulary: character-level pieces
    assert tokenizer.convert_ids_to_tokens([ids[i] for i in spans[3]]) == ["pers", "on</w>"]  # BPE split
    for word, span in zip(words, spans):
        assert len(span) == len(tokenizer(word, add_special_tokens=False)["input_ids"])
        assert span == list(range(span[0], span[-1] + 1))
        assert tokenizer.decode([ids[i] for i in span]) == word
    # Together the spans are exactly the tokens between the start and end tokens.
    assert sum(spans, []) == list(range(1, len(ids) - 1))


def test_spans_without_offsets_match_spans_with_offsets(tokenizer):
    class NoOffsets:  # what a slow (python) tokenizer does
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, text, return_offsets_mapping=False, **kw):
            if return_offsets_mapping:
                raise NotImplementedError
            return tokenizer(text, **kw)

    words = ["person", "tv monitor", "dining table"]
    assert class_token_spans(NoOffsets(), words) == class_token_spans(tokenizer, words)


def test_unplaceable_or_too_many_class_names_raise(tokenizer):
    with pytest.raises(ValueError, match="cannot place class name 'café'"):
        class_token_spans(tokenizer, ["dog", "café"])
    with pytest.raises(ValueError, match="fewer classes"):
        class_token_spans(tokenizer, [w for w in COCO_CLASSES[1:]])


def test_long_prompt_is_truncated_with_a_warning_and_keeps_the_class_part(tokenizer, caplog):
    caption = " ".join(["a dog sitting on the grass near a street"] * 12)
    prompt = prompt_with_classes(caption, ["dog", "tv monitor"])
    with caplog.at_level(logging.WARNING):
        fitted = fit_prompt(tokenizer, prompt, ["dog", "tv monitor"])
    assert count_tokens(tokenizer, prompt) > 75 >= count_tokens(tokenizer, fitted)
    assert fitted.endswith("; dog tv monitor") and caption.startswith(fitted.split(";")[0])
    assert "truncated" in caplog.text
    assert fit_prompt(tokenizer, "a dog; dog", ["dog"]) == "a dog; dog"
    with pytest.raises(ValueError, match="class part"):
        many = [w.replace(" ", "") for w in COCO_CLASSES[1:30]]
        fit_prompt(tokenizer, prompt_with_classes("a photo", many), many)


def test_jsonl_round_trip_is_atomic(tmp_path):
    records = [PromptRecord("a_0", "a dog; dog", [12], ["dog"], "dog", "a dog", "a")]
    path = write_jsonl(records, tmp_path / "out" / "prompts.jsonl")
    assert read_jsonl(path) == records
    assert [p.name for p in path.parent.iterdir()] == ["prompts.jsonl"]
    with pytest.raises(ValueError, match="lacks"):
        PromptRecord.from_dict({"prompt": "x"})
