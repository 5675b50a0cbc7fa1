"""The export folder's ``README.md``: a Hugging Face model card that states only what the checkpoint records."""
from __future__ import annotations

from pathlib import Path
from typing import Any

TAGS = ("semantic-segmentation", "dsdiff", "synthetic-data")


def _front_matter(fmt: str, check: dict[str, Any]) -> str:
    library = check.get("library", "segmentation-models-pytorch") if fmt == "smp" else "onnx"
    tags = "".join(f"  - {t}\n" for t in (*TAGS, fmt))
    return f"---\nlibrary_name: {library}\ntags:\n{tags}pipeline_tag: image-segmentation\n---\n"


def _metrics_section(metrics: dict[str, float], source: Path | None, test: dict | None) -> str:
    split = f" ({', '.join(f'{k}={v}' for k, v in test.items())})" if test else ""
    if not metrics:
        return ("## Evaluation\n\nNot found: no `metrics.json` of the run that tested this checkpoint is in the folders "
                "above it (a copied checkpoint, or one the run did not test). `python -m dsdiff.evaluate "
                f"ckpt_path=FILE` measures it on the test split{split}.\n")
    lines = [f"## Evaluation\n\nFrom the run's `{source}`, on the test split{split}; the test split chose nothing "
             "(no checkpoint, early stop or setting was picked by it):\n", "| metric | value |", "| --- | --- |"]
    for key in ("test/mIoU", "test/mIoU_tta"):
        lines.append(f"| {key} | {metrics[key]:.4f} |" if key in metrics else f"| {key} | not recorded |")
    per_class = {k: v for k, v in sorted(metrics.items()) if k not in ("test/mIoU", "test/mIoU_tta")}
    if per_class:
        lines += ["", "Other recorded test metrics (per-class IoU where the run logged them):", "",
                  "| metric | value |", "| --- | --- |", *(f"| {k} | {v:.4f} |" for k, v in per_class.items())]
    else:
        lines += ["", "Per-class IoU: not recorded with the checkpoint."]
    return "\n".join(lines) + "\n"


def _usage(fmt: str, library: str) -> str:
    pre = ("import json\nimport numpy as np\nfrom PIL import Image\n\n"
           "meta = json.load(open(\"dsdiff.json\"))\nmean = np.array(meta[\"preprocessing\"][\"mean\"], np.float32)\n"
           "std = np.array(meta[\"preprocessing\"][\"std\"], np.float32)\n"
           "image = np.asarray(Image.open(\"photo.jpg\").convert(\"RGB\"), np.float32) / 255  # H and W: multiples of the output stride\n"
           "x = ((image - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)\n")
    if fmt == "smp" and library == "transformers":
        body = ("import torch\nimport torch.nn.functional as F\nfrom transformers import Mask2FormerForUniversalSegmentation\n"
                + pre + "model = Mask2FormerForUniversalSegmentation.from_pretrained(\".\").eval()  # or the hub repo id\n"
                "with torch.no_grad():\n    out = model(pixel_values=torch.from_numpy(x))\n"
                "masks = F.interpolate(out.masks_queries_logits, size=x.shape[-2:], mode=\"bilinear\", align_corners=False)\n"
                "scores = torch.einsum(\"bqc,bqhw->bchw\", out.class_queries_logits.softmax(-1)[..., :-1], masks.sigmoid())\n"
                "mask = scores.argmax(1)[0].numpy()  # class indices, names in meta[\"class_names\"]\n")
    elif fmt == "smp":
        body = ("import segmentation_models_pytorch as smp\nimport torch\n" + pre +
                "model = smp.from_pretrained(\".\").eval()  # this folder, or the hub repo id after upload\n"
                "with torch.no_grad():\n    logits = model(torch.from_numpy(x))  # (1, C, H, W)\n"
                "mask = logits.argmax(1)[0].numpy()  # class indices, names in meta[\"class_names\"]\n")
    else:
        body = ("import onnxruntime as ort\n" + pre +
                "session = ort.InferenceSession(\"model.onnx\", providers=[\"CPUExecutionProvider\"])\n"
                "logits = session.run(None, {\"image\": x})[0]  # (1, C, H, W)\n"
                "mask = logits.argmax(1)[0]  # class indices, names in meta[\"class_names\"]\n")
    return f"## How to use\n\n```python\n{body}```\n"


def _training_section(record: dict | None) -> str:
    """What trained the net, from the checkpoint's ``training`` record (dsdiff.chain.provenance)."""
    if not record:
        return ("- Data: not recorded (a checkpoint written before dsdiff recorded its training data, or outside "
                "`dsdiff.train`).")
    labels = record.get("real_pixel_labels") or {}
    tune = labels.get("tune")
    tune_text = (f"the tune split ({_describe_split(tune)}) was read for curves and the final tune measurement; "
                 "no checkpoint was chosen by it" if tune else "no tune split")
    recipe = record.get("recipe") or {}
    optimizer = recipe.get("optimizer") or {}
    opt = ", ".join(f"{k}={v}" for k, v in optimizer.items() if k not in ("_target_", "_partial_"))
    lines = [f"- Task: `{record.get('task')}`, dsdiff {record.get('dsdiff')}, seed {record.get('seed')}, "
             f"classes `{record.get('class_list')}`."]
    if record.get("train_data") == "synthetic":
        syn = record.get("synthetic") or {}
        gen = syn.get("generator") or {}
        prompts = syn.get("prompts") or {}
        digest = prompts.get("digest")
        lines += [
            "- Training data: **synthetic** (images generated by a text-to-image diffusion model, pixel labels from "
            "its class-prompt cross-attention refined by self-attention). **No real pixel labels were used for "
            f"training**; {tune_text}.",
            f"- Synthetic set: {syn.get('num_images')} samples ({syn.get('mode')}), generator `{_model_name(gen.get('model'))}"
            + (f", {gen.get('num_inference_steps')} steps, guidance {gen.get('guidance_scale')}"
               if gen.get("num_inference_steps") is not None else "")
            + (f"; prompts: {prompts.get('records')} records from `{prompts.get('file') or 'class templates'}`, "
               f"digest `{digest}`" if digest else
               f"; prompts: `{prompts.get('synthetic.prompts') or 'class templates'}`") + ".",
        ]
        selftrain = recipe.get("selftrain") or {}
        if selftrain.get("rounds"):
            lines.append(f"- Self-training: {selftrain.get('rounds')} round(s), mode `{selftrain.get('mode')}`, "
                         f"student from `{selftrain.get('init')}`, TTA pseudo-labels {selftrain.get('tta')}.")
    else:
        lines.append(f"- Training data: real pixel labels (`{record.get('train_data')}`); {tune_text}.")
    lines += [f"- Recipe: model `{recipe.get('model')}`, {recipe.get('max_steps')} steps per stage, global batch "
              f"{recipe.get('global_batch')}, optimizer {opt or 'n/a'}, EMA decay {recipe.get('ema_decay')}.",
              f"- Trained with: `{record.get('command')}`"]
    return "\n".join(lines)


def _model_name(model) -> str:
    """A hub id, or a local folder's name and weights digest (what dataset.json records)."""
    return f"{model.get('name')}` (local folder, digest `{model.get('digest')}`)" if isinstance(model, dict) else f"{model}`"


def _describe_split(split: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in split.items() if k != "target") or str(split.get("target"))


def model_card(info: dict, fmt: str, command: str, metrics: dict[str, float], metrics_source: Path | None,
               check: dict[str, Any]) -> str:
    """The card's Markdown text."""
    names = list(info["class_names"])
    net = info["net"]
    args = ", ".join(f"{k}={v!r}" for k, v in sorted(net["args"].items()))
    classes = "\n".join(f"| {i} | {n} | {tuple(info['palette'][3 * i:3 * i + 3])} |" for i, n in enumerate(names))
    lib = "transformers'" if check.get("library") == "transformers" else "smp's"
    files = f"`config.json` + `model.safetensors` ({lib} `save_pretrained`)" if fmt == "smp" else "`model.onnx`, `export.json`"
    if fmt == "onnx":
        rows = "\n".join(f"| {r['input'][2]}x{r['input'][3]} | {r['argmax_agreement']:.4%} | {r['max_abs_diff']:.3g} |"
                         for r in check.get("checks", []))
        checked = ("onnxruntime against PyTorch on random normalised inputs (from `export.json`):\n\n"
                   f"| input HxW | argmax agreement | max abs diff |\n| --- | --- | --- |\n{rows}\n")
    else:
        checked = (f"`{check['check'].get('loader', 'smp.from_pretrained')}` of this folder against the checkpoint's net on a random 64x64 input: max abs "
                   f"logit difference {check['check']['max_abs_diff']:.3g}.\n")
    return f"""{_front_matter(fmt, check)}
# dsdiff semantic segmenter ({net['class'].rsplit('.', 1)[-1]}, {fmt})

A semantic segmentation network exported by `dsdiff-export` from a checkpoint written by `dsdiff.train`
(Dataset Diffusion: segmenters trained on synthetic images and labels). Files: {files}, `dsdiff.json`
(classes, palette, preprocessing) and this card.

## Classes

{len(names)} classes; the logits' channel i is class i. `ignore_index` during training: {info.get('ignore_index')}.

| index | name | palette RGB |
| --- | --- | --- |
{classes}

## Training

- Network: `{net['class']}({args})`.
{_training_section(info.get("training"))}

{_metrics_section(metrics, metrics_source, (info.get("training") or {}).get("test"))}
## Preprocessing

RGB, scaled to [0, 1], then `(x - mean) / std` with mean `{list(info['mean'])}` and std `{list(info['std'])}`,
as a (1, 3, H, W) float32 tensor; H and W must be multiples of the net's output stride (pad the image).
dsdiff evaluated this model after a keep-ratio resize to `eval_scale` = `{info.get('eval_scale')}`
(and optionally TTA over scales `{info.get('tta_scales')}`, flip `{info.get('tta_flip')}`); the exported
net does none of that: resize the image yourself to match the evaluation.

## Export

Made with:

```bash
{command}
```

Checked: {checked}
{_usage(fmt, check.get("library", ""))}
## Upload to the Hugging Face hub

```python
from huggingface_hub import HfApi

HfApi().upload_folder(folder_path=".", repo_id="<user>/<model-name>", repo_type="model")  # needs `huggingface-cli login`
```

## Known limits

- Only what the checkpoint records is stated here; the training data and its licence are not recorded.
- The export is the net alone: no resize to `eval_scale`, no sliding window, no test-time augmentation,
  so its masks can differ from `dsdiff-predict`'s on the same image.
- A model trained on synthetic labels inherits their errors (object boundaries from attention maps), and
  has seen only the classes listed above.
"""
