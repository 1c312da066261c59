"""Why does captioning miss on shape? Two probes of a shapes-world checkpoint (prints figures, not a test).

    python benchmarks/probe_shapes.py [--checkpoint DIR]

1. Is circle-vs-square in the VAE latents? A linear probe (logistic regression) on flattened latents.
2. Can the frozen text tower say it? The distance between its output embeddings of the shape words.
3. Does the caption path use it? The text tower's probabilities of " circle" and " square" after
   "a {size} {color}" for circle and square images.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from xfusion_serve import EMBEDDED_CHECKPOINT, ImageSegment, load_checkpoint
from xfusion_serve.demo import shapes
from xfusion_serve.model import prompts
from xfusion_serve.model.latents import encode_images
from xfusion_serve.model.sequence import pad_sequences, padded_forward


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(EMBEDDED_CHECKPOINT))
    p.add_argument("--samples", type=int, default=3000)
    args = p.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    model, tok = ckpt.model, ckpt.tokenizer
    h, w = ckpt.config.image_sizes[0]

    pairs = [s for s in (shapes.sample(4, i) for i in range(args.samples)) if s[0].shape != "triangle"]
    z = torch.cat([encode_images(ckpt.vae, [im for _, im in pairs[i : i + 256]], h, w)
                   for i in range(0, len(pairs), 256)]).flatten(1)
    y = torch.tensor([1.0 if s.shape == "circle" else 0.0 for s, _ in pairs])
    train = int(0.8 * len(y))
    z = (z - z[:train].mean(0)) / z[:train].std(0).clamp(min=1e-3)
    w_, b = torch.zeros(z.shape[1], requires_grad=True), torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w_, b], lr=1e-2)
    for _ in range(500):
        loss = F.binary_cross_entropy_with_logits(z[:train] @ w_ + b, y[:train])
        opt.zero_grad()
        loss.backward()
        opt.step()
    acc = ((z[train:] @ w_ + b > 0).float() == y[train:]).float().mean()
    print(f"linear probe, circle vs square on VAE latents: held-out accuracy {acc:.1%} ({len(y)} images)")

    # 3. Can the frozen text tower say it? Its output embeddings of the shape words (colours for scale):
    # words it never had to tell apart in its own text end up near-identical, and then no image can help.
    out = model.text.lm_head.weight if not model.text.tied else model.text.model.embed_tokens.weight
    emb = {w: out[tok(" " + w, add_special_tokens=False).input_ids[0]] for w in ("circle", "square", "triangle",
                                                                                  "red", "blue")}
    print("text tower output embeddings, L2 distance: " + ", ".join(
        f"{a}-{b} {(emb[a] - emb[b]).norm():.3f}" for a, b in (("circle", "square"), ("circle", "triangle"),
                                                                ("square", "triangle"), ("red", "blue"))))

    ids = {name: tok(" " + name, add_special_tokens=False).input_ids[0] for name in ("circle", "square")}
    probs = {"circle": [], "square": []}
    for shape, image in pairs[:200]:
        latent = encode_images(ckpt.vae, [image], h, w)[0]
        seq = model.embed_sequence([prompts.caption_prefix(tok), ImageSegment(latent, 0.0),
                                    prompts.encode(tok, f"a {shape.size} {shape.color}")])
        with torch.no_grad():
            p_next = model.text.logits(padded_forward(model, *pad_sequences([seq]))[0, -1:]).softmax(-1)[0]
        probs[shape.shape].append([p_next[ids["circle"]].item(), p_next[ids["square"]].item()])
    for shape, rows in probs.items():
        t = torch.tensor(rows)
        print(f"caption path, {shape} images ({len(rows)}): P(circle) {t[:, 0].mean():.3f}  "
              f"P(square) {t[:, 1].mean():.3f}  circle preferred {(t[:, 0] > t[:, 1]).float().mean():.0%}")


if __name__ == "__main__":
    main()
