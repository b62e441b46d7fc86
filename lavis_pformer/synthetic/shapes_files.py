"""The files of the shapes world (``shapes_world.generate`` writes them): COCO caption ground truth, VQAv2
question and annotation files, LAVIS's VQA eval list, PNG folders, JSON and text lines."""
import json
import os


def dump_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


def coco_gt(split, seed, records):
    """COCO caption ground truth for pycocoevalcap of caption records (one caption per image)."""
    return {
        "info": {"description": f"shapes world captions, split {split}, seed {seed}", "version": "1.0"},
        "licenses": [],
        "type": "captions",
        "images": [{"id": int(r["image_id"]), "file_name": r["image"]} for r in records],
        "annotations": [
            {"image_id": int(r["image_id"]), "caption": r["caption"], "id": i + 1}
            for i, r in enumerate(records)
        ],
    }


def vqa_files(split, seed, questions):
    """(VQAv2 questions file, VQAv2 annotations file, LAVIS's eval list) of a split's questions."""
    info = {"description": f"shapes world VQA, split {split}, seed {seed}", "version": "1.0"}
    licence = {"name": "generated", "url": ""}
    qfile = {
        "info": info, "task_type": "Open-Ended", "data_type": "shapes_world", "data_subtype": split,
        "license": licence,
        "questions": [
            {"question_id": q["question_id"], "image_id": q["image_id"], "question": q["question"]}
            for q in questions
        ],
    }
    afile = {
        "info": info, "license": licence, "data_type": "shapes_world", "data_subtype": split,
        "annotations": [
            {
                "question_id": q["question_id"],
                "image_id": q["image_id"],
                "question_type": q["question_type"],
                "answer_type": q["question_type"],
                "answers": [
                    {"answer": q["answer"], "answer_confidence": "yes", "answer_id": j + 1}
                    for j in range(10)
                ],
                "multiple_choice_answer": q["answer"],
            }
            for q in questions
        ],
    }
    lavis_list = [
        {
            "question_id": q["question_id"], "question": q["question"], "image": q["image"],
            "image_id": q["image_id"], "answer": [q["answer"]], "question_type": q["question_type"],
        }
        for q in questions
    ]
    return qfile, afile, lavis_list


def write_images(out_dir, split, records, images):
    """Save ``images`` as ``out_dir/images/<split>/<name of the record's image>``; drop other PNGs there."""
    folder = os.path.join(out_dir, "images", split)
    os.makedirs(folder, exist_ok=True)
    keep = set()
    for rec, img in zip(records, images):
        name = os.path.basename(rec["image"])
        keep.add(name)
        img.save(os.path.join(folder, name), format="PNG")
    for name in os.listdir(folder):  # images of an earlier, larger run
        if name.endswith(".png") and name not in keep:
            os.remove(os.path.join(folder, name))
