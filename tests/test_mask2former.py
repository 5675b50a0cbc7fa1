"""Mask2Former as a segmenter: uncertain pixels give no gradient; semantic scores through dsdiff's inference."""
import pytest
import torch

from dsdiff.models.inference import predict_logits
from dsdiff.models.mask2former import IgnoreAwareMask2FormerLoss, Mask2FormerNet, semantic_scores
from dsdiff.utils.errors import ModelLoadError


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return Mask2FormerNet(4, encoder_name="resnet18", encoder_weights=None, decoder_channels=32, num_queries=6,
                          encoder_layers=1, decoder_layers=3, train_num_points=64).eval()


def test_uncertain_pixels_give_exactly_zero_gradient_and_certain_ones_do():
    torch.manual_seed(0)
    loss = IgnoreAwareMask2FormerLoss(3, num_points=200)
    labels = torch.randint(0, 3, (2, 16, 16))
    labels[:, 4:10] = 255  # the uncertain band
    labels[1, :, :5] = 255
    masks = torch.randn(2, 5, 16, 16, requires_grad=True)  # pixel-level mask logits, at the label's size
    classes = torch.randn(2, 5, 4, requires_grad=True)
    out = loss([masks], [classes], labels)
    out["loss"].backward()
    band = (labels == 255)[:, None].expand_as(masks)
    assert masks.grad[band].abs().max().item() == 0.0
    assert masks.grad[~band].abs().sum() > 0 and classes.grad.abs().sum() > 0
    assert torch.isfinite(out["loss"]) and out["loss"] > 0


def test_a_wholly_uncertain_batch_gives_a_zero_loss_with_no_gradient():
    loss = IgnoreAwareMask2FormerLoss(3, num_points=50)
    masks = torch.randn(2, 5, 8, 8, requires_grad=True)
    classes = torch.randn(2, 5, 4, requires_grad=True)
    out = loss([masks], [classes], torch.full((2, 8, 8), 255))
    out["loss"].backward()
    assert out["loss"].item() == 0.0 and masks.grad.abs().sum() == 0 and classes.grad.abs().sum() == 0


def test_semantic_scores_have_the_input_shape_and_match_the_einsum(net):
    x = torch.randn(2, 3, 50, 70)  # not a multiple of 32: predict_logits pads and crops back
    with torch.no_grad():
        logits = predict_logits(net, x)
        padded = torch.nn.functional.pad(x, (0, 26, 0, 14))
        out = net.model(pixel_values=padded)
        expected = semantic_scores(out.class_queries_logits, out.masks_queries_logits, (64, 96))[..., :50, :70]
    assert logits.shape == (2, 4, 50, 70)
    scores = logits.exp()
    # each class score is sum_q p_q(class) sigmoid(mask_q): in [0, Q]; summed over classes at most Q
    assert scores.min() >= 0 and scores.sum(1).max() <= 6 + 1e-4
    torch.testing.assert_close(scores, expected.clamp_min(1e-6), rtol=1e-4, atol=1e-5)
    probs = logits.softmax(1)  # what the pseudo-labeller reads: the normalised score
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 50, 70))
    assert torch.equal(probs.argmax(1), expected.argmax(1))


def test_training_loss_trains_and_param_groups_follow_mmseg(net):
    net.train()
    x, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64))
    labels[:, :8] = 255
    losses = net.training_loss(x, labels)
    assert set(losses) >= {"loss", "loss_main", "loss_aux", "loss_cls", "loss_mask", "loss_dice"}
    torch.testing.assert_close(losses["loss"], losses["loss_main"] + losses["loss_aux"])
    groups = net.param_groups(1e-4, 0.1)
    no_decay = {id(p) for g in groups if g.get("weight_decay") == 0.0 for p in g["params"]}
    queries = net.model.model.transformer_module.queries_embedder.weight
    assert id(queries) in no_decay
    backbone = {id(p) for p in net.backbone_parameters()}
    assert all(g["lr"] == pytest.approx(1e-5) for g in groups if any(id(p) in backbone for p in g["params"]))
    # mmseg's R50 recipe freezes the backbone's BatchNorm affine weights
    assert not net.encoder._backbone.bn1.weight.requires_grad
    net.eval()


def test_missing_pretrained_weights_name_the_fix(monkeypatch):
    import timm

    real = timm.create_model

    def offline(*args, **kwargs):  # the random backbone builds; downloading weights fails as it does offline
        if kwargs.get("pretrained"):
            raise OSError("no network")
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ModelLoadError, match="model.net.encoder_weights=null"):
        Mask2FormerNet(4, encoder_name="resnet18", encoder_weights="imagenet", decoder_channels=32, num_queries=4,
                       encoder_layers=1, decoder_layers=2)


def _run_chain(make_cfg, overrides, run):
    import json

    from dsdiff.train import train

    train(make_cfg(overrides, output_dir=run))
    stages = json.loads((run / "stages.json").read_text())
    saved = json.loads((run / "metrics.json").read_text())
    ckpt = torch.load(run / "selftrain_1" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return stages, saved, ckpt


def test_shapes_chain_trains_pseudo_labels_and_tests_a_mask2former(make_cfg, tmp_path):
    """The whole shapes chain with model=mask2former_small: the self-training stage reads the Mask2Former
    teacher's pseudo-labels, and the tested weights are a Mask2Former's."""
    import numpy as np
    from PIL import Image

    run = tmp_path / "run"
    stages, saved, ckpt = _run_chain(make_cfg, ["+experiment=shapes_deeplab", "debug=fast", "model=mask2former_small",
                                                f"synthetic.dir={tmp_path / 'syn'}", f"paths.data_dir={tmp_path / 'data'}"], run)
    assert {"train", "pseudo_1", "selftrain_1", "test"} <= set(stages)
    assert 0 <= saved["test/mIoU"] <= 1 and 0 <= saved["test/mIoU_tta"] <= 1
    assert any("transformer_module" in k or "pixel_level_module" in k for k in ckpt["state_dict"])
    masks = sorted((run / "pseudo_1").rglob("*.png"))
    assert masks and all(set(np.unique(np.array(Image.open(m)))) <= set(range(4)) | {255} for m in masks)


@pytest.mark.slow  # a VOC-layout fixture and a tiny SD pipeline: about 40 s
def test_voc_mask2former_recipe_runs_its_chain(make_cfg, voc_root, tmp_path):
    from dsdiff.testing.tiny_sd import save_tiny_pipeline

    sd = save_tiny_pipeline(tmp_path / "sd")
    stages, saved, ckpt = _run_chain(make_cfg, [
        "+experiment=voc_mask2former", "debug=fast", f"paths.voc={voc_root}", f"generator.model={sd}", "prompts=default",
        f"synthetic.dir={tmp_path / 'syn'}", "synthetic.num_images=4", "generator.num_inference_steps=2", "generator.batch_size=2",
        "synthetic.filters.drop_empty=false", "trainer.max_steps=3", "trainer.val_check_interval=2", "data.eval_scale=[128,64]",
    ], tmp_path / "run")
    assert {"generate", "train", "pseudo_1", "selftrain_1", "test"} <= set(stages)
    assert 0 <= saved["test/mIoU"] <= 1 and 0 <= saved["test/mIoU_tta"] <= 1
    assert ckpt["global_step"] == 3
    assert any("pixel_level_module" in k for k in ckpt["state_dict"])


@pytest.mark.parametrize("override", ["model.net.num_queries=0", "model.net.train_num_points=0",
                                      "model.net.importance_sample_ratio=2", "model.net.decoder_channels=48"])
def test_a_bad_mask2former_setting_stops_the_run_before_generation(make_cfg, tmp_path, override):
    from dsdiff.train import train
    from dsdiff.utils.errors import SettingError

    cfg = make_cfg(["+experiment=shapes_deeplab", "debug=fast", "model=mask2former_small", override,
                    f"synthetic.dir={tmp_path / 'syn'}", f"paths.data_dir={tmp_path / 'data'}"], output_dir=tmp_path / "run")
    with pytest.raises(SettingError, match=override.split("=")[0]):
        train(cfg)
    assert not (tmp_path / "syn").exists() and not (tmp_path / "run" / "stages.json").exists()


def test_a_bad_deeplab_head_setting_stops_the_run_before_generation(make_cfg, tmp_path):
    from dsdiff.train import train
    from dsdiff.utils.errors import SettingError

    cfg = make_cfg(["+experiment=shapes_deeplab", "debug=fast", "model.net.head=aspp", f"synthetic.dir={tmp_path / 'syn'}"],
                   output_dir=tmp_path / "run")
    with pytest.raises(SettingError, match="model.net.head='aspp'"):
        train(cfg)
    assert not (tmp_path / "syn").exists()
