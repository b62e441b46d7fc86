"""Export a trained BLIP-2 to a folder that Hugging Face transformers loads as ``Blip2ForConditionalGeneration``.

    python -m lavis_pformer.export_hf --cfg-path <stage-2 or caption fine-tuning config> \\
        --checkpoint <checkpoint_N.pth> --out <dir> [--dtype fp32|fp16|bf16] [--options key=value ...]

What is written, what is refused and what differs: docs/export.md. The modules: ``cli`` (the command and
``export``), ``lavis_model`` (the model built as an evaluation run builds it), ``mapping`` (ViT, Q-Former and LLM
configs and tensors under transformers' names), ``processors`` (tokenizer and image processor), ``weights_files``
(safetensors written without a newer transformers) and ``model_card`` (training provenance).
"""


class ExportError(ValueError):
    """The model cannot be written as a transformers Blip2ForConditionalGeneration without changing what it computes."""
