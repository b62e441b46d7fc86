"""The transformers side of tests/test_export_hf.py: run with a recent transformers on PYTHONPATH (not LAVIS's).

    python tests/hf_side.py spec.json results.pt

For each exported folder in the spec: load it with Blip2ForConditionalGeneration / Blip2Processor, then
compute what the spec asks on the LAVIS side's pixel tensors and texts (logits, greedy captions, VQA answers),
and the processor's own pixel values for the spec's image files. Writes a dict of tensors / lists / strings.
"""
import contextlib
import copy
import io
import json
import os
import sys

import torch
import transformers
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2Processor


def run_job(job):
    folder = job["folder"]
    model, info = Blip2ForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    model.eval()
    processor = Blip2Processor.from_pretrained(folder)
    tokenizer = processor.tokenizer
    pixels = torch.load(job["pixels"], weights_only=True)  # [1, 3, S, S], from LAVIS's eval processor
    image = Image.open(job["image"])
    pil_processor = Blip2Processor.from_pretrained(folder, backend="pil")  # LAVIS resizes PIL images
    out = {
        "loading_info": {k: sorted(map(str, v)) for k, v in info.items()},
        "image_token_id": model.config.image_token_id,
        "tokenizer_image_token_id": tokenizer.convert_tokens_to_ids("<image>"),
        "num_query_tokens": processor.num_query_tokens,
        "image_processor": type(processor.image_processor).__name__,
        "pixels_default": processor(images=image, return_tensors="pt")["pixel_values"],
        "pixels_pil": pil_processor(images=image, return_tensors="pt")["pixel_values"],
        "dtype": str(next(model.language_model.parameters()).dtype),
    }

    def settings(**kwargs):  # the folder's generation_config.json with these changes
        config = copy.deepcopy(model.generation_config)
        config.update(**kwargs)
        return {"generation_config": config}

    gen = settings(max_new_tokens=job["max_new_tokens"])
    with torch.no_grad():
        enc = processor(images=image, text=job["logits_text"], return_tensors="pt")
        kwargs = {}
        if job.get("logits_labels") is not None:
            kwargs["labels"] = tokenizer(job["logits_labels"], return_tensors="pt").input_ids
        out["logits_input_ids"] = enc["input_ids"]
        out["logits"] = model(pixel_values=pixels, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                              **kwargs).logits
        decoder_only = model.config.use_decoder_only_language_model
        captions = []
        for prompt in job["caption_prompts"]:
            if prompt is None:  # no text: generate() builds [<image> x Q, bos] itself (decoder-only LMs)
                ids = model.generate(pixel_values=pixels, **gen)
                prompt_len = processor.num_query_tokens + 1
            else:
                enc = processor(images=image, text=prompt, return_tensors="pt")
                ids = model.generate(pixel_values=pixels, input_ids=enc["input_ids"],
                                     attention_mask=enc["attention_mask"], **gen)
                prompt_len = enc["input_ids"].shape[1]
            if decoder_only:  # the output starts with the prompt; LAVIS returns the continuation only
                ids = ids[:, prompt_len:]
            captions.append(processor.batch_decode(ids, skip_special_tokens=True)[0].strip())
        out["captions"] = captions
        questions = [job["vqa_prompt"].format(q) for q in job["questions"]]
        enc = processor(images=[image] * len(questions), text=questions, padding=True, return_tensors="pt")
        batch = pixels.expand(len(questions), -1, -1, -1)
        answers = {}
        for beams in job["vqa_beams"]:
            beam = {"num_beams": beams, "length_penalty": job["vqa_length_penalty"]} if beams > 1 else {}
            ids = model.generate(pixel_values=batch, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                 **settings(max_new_tokens=job["vqa_max_len"], **beam))
            if decoder_only:
                ids = ids[:, enc["input_ids"].shape[1]:]
            answers[str(beams)] = [a.strip() for a in processor.batch_decode(ids, skip_special_tokens=True)]
        out["answers"] = answers
    if job.get("snippet_image"):
        out["snippet_output"] = run_model_card_snippet(folder, job["snippet_image"])
    return out


def run_model_card_snippet(folder, image):
    """Run the README's python block as a reader would, on ``image``; returns what it prints."""
    with open(os.path.join(folder, "README.md")) as f:
        code = f.read().split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace("FOLDER", repr(folder)).replace('"photo.jpg"', repr(image))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, os.path.join(folder, "README.md"), "exec"), {})
    return printed.getvalue()


def main():
    spec_path, out_path = sys.argv[1:3]
    with open(spec_path) as f:
        spec = json.load(f)
    results = {"transformers_version": transformers.__version__, "torch_version": str(torch.__version__),
               "jobs": {name: run_job(job) for name, job in spec["jobs"].items()}}
    torch.save(results, out_path)


if __name__ == "__main__":
    main()
