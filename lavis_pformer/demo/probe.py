"""Linear probes along the image side of a trained demo model: where does the scene information get lost?

For each quadrant of the image, a linear classifier reads its colour (6 colours or empty) and its shape
(3 shapes or empty) from the features at one point of the flow:

- ``vit``: the frozen ViT's tokens after ``ln_vision`` [N, 1 + P, D] (the same for every arm);
- ``qformer``: the Q-Former's query outputs [N, Q, H];
- ``prompt``: the soft prompt the LLM reads, ``opt_proj`` of the query outputs [N, Q, H_llm].

The probes are fitted on the training images and scored on the test images; a quadrant is empty about half
of the time, so predicting "empty" everywhere scores about 0.5. A linear probe is a lower bound on what
the features hold.
"""
import re

import torch
import torch.nn.functional as F

from lavis_pformer.synthetic.shapes_world import COLOURS, POSITIONS, SHAPES

CAPTION_OBJECT = re.compile(r"\b(?:a|an) (\w+) (\w+) at the (top left|top right|bottom left|bottom right)")
POINTS = ("vit", "qformer", "prompt")


def caption_objects(caption):
    """{(quadrant, colour, shape)} named in a shapes-world caption (unknown words are skipped)."""
    return {(POSITIONS.index(p), c, s) for c, s, p in CAPTION_OBJECT.findall(caption.lower())
            if c in COLOURS and s in SHAPES}


def quadrant_targets(captions):
    """(colour [N, 4], shape [N, 4]) class ids per quadrant from the captions (0 = empty)."""
    colour = torch.zeros(len(captions), 4, dtype=torch.long)
    shape = torch.zeros(len(captions), 4, dtype=torch.long)
    colour_ids = {c: i + 1 for i, c in enumerate(COLOURS)}
    shape_ids = {s: i + 1 for i, s in enumerate(SHAPES)}
    for i, caption in enumerate(captions):
        for quadrant, c, s in caption_objects(caption):
            colour[i, quadrant], shape[i, quadrant] = colour_ids[c], shape_ids[s]
    return colour, shape


@torch.no_grad()
def features(model, images, batch_size=256):
    """{"vit", "qformer", "prompt"}: [N, F] flattened features of ``images`` [N, 3, H, W] (model in eval mode)."""
    model.eval()
    parts = {p: [] for p in POINTS}
    for start in range(0, len(images), batch_size):
        image = images[start : start + batch_size]
        image_embeds = model.ln_vision(model.visual_encoder(image))
        query = model.Qformer.bert(
            query_embeds=model.query_tokens.expand(image.size(0), -1, -1), encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long), return_dict=True,
        ).last_hidden_state
        for name, x in (("vit", image_embeds), ("qformer", query), ("prompt", model.opt_proj(query))):
            parts[name].append(x.flatten(1).float())
    return {p: torch.cat(v) for p, v in parts.items()}


def probe_accuracy(train_x, train_targets, test_x, test_targets, steps=300, lr=1e-2, seed=0):
    """Fit one linear layer (4 quadrants x (7 colour + 4 shape) logits) on standardised ``train_x`` [N, F];
    returns {"colour", "shape"}: the share of test quadrants read right."""
    torch.manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    n_colour, n_shape = len(COLOURS) + 1, len(SHAPES) + 1
    layer = torch.nn.Linear(train_x.size(1), 4 * (n_colour + n_shape))
    optim = torch.optim.Adam(layer.parameters(), lr=lr, weight_decay=1e-4)

    def split(logits):
        logits = logits.view(-1, 4, n_colour + n_shape)
        return logits[..., :n_colour], logits[..., n_colour:]

    colour, shape = train_targets
    for _ in range(steps):
        c, s = split(layer(train_x))
        loss = F.cross_entropy(c.flatten(0, 1), colour.flatten()) + F.cross_entropy(s.flatten(0, 1), shape.flatten())
        optim.zero_grad()
        loss.backward()
        optim.step()
    with torch.no_grad():
        c, s = split(layer(test_x))
    return {"colour": (c.argmax(-1) == test_targets[0]).float().mean().item(),
            "shape": (s.argmax(-1) == test_targets[1]).float().mean().item()}


def probe_model(model, train_images, train_captions, test_images, test_captions, steps=300):
    """{point: {"colour", "shape"}} for the three points of the flow, plus the "empty everywhere" level."""
    train_targets, test_targets = quadrant_targets(train_captions), quadrant_targets(test_captions)
    train_f, test_f = features(model, train_images), features(model, test_images)
    out = {p: probe_accuracy(train_f[p], train_targets, test_f[p], test_targets, steps=steps) for p in POINTS}
    out["all_empty"] = {"colour": (test_targets[0] == 0).float().mean().item(),
                        "shape": (test_targets[1] == 0).float().mean().item()}
    return out
