"""`python -m dsdiff.pretrain`: a few steps on a tiny config, resume from last.ckpt, export a loadable pipeline."""
import json

import numpy as np
import torch

from dsdiff.data.classes import SHAPES_CLASSES
from dsdiff.diffusion import SyntheticGenerator
from dsdiff.pretrain import pretrain
from dsdiff.shapes_t2i.system import TextToImage

TINY = [
    "model.pipeline.block_out_channels=[8,16]", "model.pipeline.text_dim=16", "model.pipeline.heads=2",
    "model.pipeline.norm_num_groups=4", "data.batch_size=4", "data.size=64", "model.warmup_steps=2",
    "+callbacks.progress_bar.refresh_rate=1", "logger=none",
]


def _count_steps(monkeypatch):
    calls = []
    original = TextToImage.training_step

    def counting(self, batch, batch_idx):
        calls.append(self.global_step)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(TextToImage, "training_step", counting)
    return calls


def test_pretrain_resumes_from_last_ckpt_and_exports(make_cfg, tmp_path, monkeypatch, caplog):
    import logging

    calls = _count_steps(monkeypatch)
    cfg = make_cfg(["+experiment=shapes_t2i", "max_steps=3", "checkpoint_every=3", *TINY], config_name="pretrain")
    with caplog.at_level(logging.INFO, logger="dsdiff"):
        metrics, objects = pretrain(cfg)
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pretrain: ")]
    assert progress[-1].startswith("pretrain: 3/3 steps (100%)") and "ETA" in progress[-1]  # lines a log file shows
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert calls == [0, 1, 2] and metrics["steps"] == 3
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 3
    first_export = {k: v.clone() for k, v in objects["model"].unet.state_dict().items()}

    calls.clear()  # same run dir, ckpt_path=auto: continue from step 3, not from 0
    cfg = make_cfg(["+experiment=shapes_t2i", "max_steps=5", "checkpoint_every=5", *TINY], config_name="pretrain")
    metrics, objects = pretrain(cfg)
    assert calls == [3, 4] and metrics["steps"] == 5
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 5
    assert any(not torch.equal(first_export[k], v) for k, v in objects["model"].unet.state_dict().items())

    folder = tmp_path / "pipeline"
    assert json.loads((folder / "training.json").read_text())["steps"] == 5
    assert json.loads((folder / "model_index.json").read_text())["vae"] == [None, None]
    assert list((folder / "unet").glob("*.safetensors")) and list((folder / "text_encoder").glob("*.safetensors"))
    gen = SyntheticGenerator.from_pretrained(folder, SHAPES_CLASSES, device="cpu", num_inference_steps=2, self_res=16)
    sample = gen(["a ball and a tent; ball tent"], seeds=[0])[0]
    assert sample.image.shape == (32, 32, 3) and sample.class_ids == [1, 4]


def test_train_false_exports_the_checkpoint_ema_weights(make_cfg, tmp_path):
    cfg = make_cfg(["+experiment=shapes_t2i", "max_steps=2", "checkpoint_every=2", *TINY], config_name="pretrain")
    _, trained = pretrain(cfg)
    ema = {k: v.clone() for k, v in trained["model"].unet.state_dict().items()}
    cfg = make_cfg(["+experiment=shapes_t2i", "train=false", f"export_dir={tmp_path / 'again'}", *TINY],
                   config_name="pretrain")
    metrics, objects = pretrain(cfg)
    assert metrics["steps"] == 2
    for k, v in objects["model"].unet.state_dict().items():
        assert torch.equal(v, ema[k]), k


def test_bad_ckpt_path_names_the_fix(make_cfg):
    import pytest

    cfg = make_cfg(["+experiment=shapes_t2i", "ckpt_path=/nowhere/last.ckpt", *TINY], config_name="pretrain")
    with pytest.raises(FileNotFoundError, match="ckpt_path=<run dir>/checkpoints/last.ckpt"):
        pretrain(cfg)


def test_training_texts_mix_the_generator_forms():
    from dsdiff.shapes_t2i.net import build_pipeline
    from tests.shapes_t2i.conftest import TINY as tiny

    torch.manual_seed(0)
    model = TextToImage(build_pipeline(**tiny), optimizer=torch.optim.AdamW)
    batch = {"caption": ["a ball and a leaf"] * 400, "classes": ["ball leaf"] * 400}
    texts = model.texts(batch)
    shares = {t: texts.count(t) / len(texts) for t in set(texts)}
    expected = {"a ball and a leaf": 0.4, "a ball and a leaf; ball leaf": 0.3, "ball leaf": 0.2, "": 0.1}
    assert set(shares) == set(expected)
    assert all(abs(shares[t] - p) < 0.08 for t, p in expected.items()), shares
    assert np.isclose(sum(shares.values()), 1.0)


def test_a_contextual_warm_start_exports_its_layer_and_its_lineage(make_cfg, tmp_path, pixel_pipeline_dir):
    from dsdiff.diffusion.pipeline import folder_digest

    cfg = make_cfg(["+experiment=shapes_t2i_contextual", f"model.pipeline.init={pixel_pipeline_dir}", "model.pipeline.heads=2",
                    "max_steps=2", "checkpoint_every=2", "data.batch_size=4", "data.size=64", "model.warmup_steps=2",
                    "logger=none"], config_name="pretrain")
    pretrain(cfg)
    folder = tmp_path / "pipeline"
    assert json.loads((folder / "text_encoder" / "config.json").read_text())["num_hidden_layers"] == 1
    assert not any("_name_or_path" in json.loads(c.read_text()) for c in folder.glob("*/config.json"))  # no local path
    lineage = json.loads((folder / "training.json").read_text())["warm_start"]
    assert lineage["from"] == str(pixel_pipeline_dir) and lineage["digest"] == folder_digest(pixel_pipeline_dir)
