"""Can the LM find the object a question names, given the scene in a form it could read?

Splits the tiny VLM's problem (evals/results/tiny_vlm_training.md) in two: no tower and no projector,
only the LM (SmolLM2-135M, all layers or the first --layers, a LoRA r16 on attention and MLP) learns
to answer the scene questions with the scene given
- `text`: as words ("Objects: small red circle on the left, ...") in place of the image;
- `blend`: as the image's 256 patch vectors, each object patch the mean embedding of its colour,
  shape and side words and every other patch 'background' (stage 1b's `anchor_target: blend`), so
  what a perfect projector for that target gives;
- `words`: as 256 patch vectors, each object patch one of its words by its column (colour, shape,
  side for columns 0, 1, 2 mod 3), so along each row of an object the colour patch sits just before
  the shape patch, as in text (`anchor_target: words`); a projector that reads each patch alone can
  produce it, since the tower's features carry the patch's position.
If `blend` stays at the answer priors while `words` or `text` learns, the anchoring target itself
hides the key the LM's lookup needs, whatever the tower and projector learn.

    python benchmarks/vlm_lookup.py --inputs text blend words [--layers 12] [--steps 150]

Cost on 2 CPU cores with all 30 layers, 16 questions a step (2026-12-03): `text` ~9 s a step;
`blend` and `words` carry 256 patch vectors a question, ~4x the tokens: ~45 s a step and ~17 GB
of memory, so 50 steps of one form take ~40 minutes here.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from real_data import bench_parser, machine, wilson
from rich.progress import track

from lmkit.loader import load_model
from lmkit.modeling import truncate_layers
from lmkit.pruning.scenes import describe
from lmkit.pruning.tiny_vlm import draw_scenes
from lmkit.pruning.tiny_vlm_anchor import ANCHOR_WORDS, _anchor_targets, _word_vectors
from lmkit.pruning.tiny_vlm_vision import StageOptimizer
from lmkit.pruning.vlm_config import ATTENTION_AND_MLP, StageSpec, TinyVLMConfig
from lmkit.report import write_report, write_table

IMAGE = "<image>"
SCENES = TinyVLMConfig()  # the recipe's scenes: 224 px, patch 14, 256 patches
LORA = LoraConfig(
    r=16,
    lora_alpha=32,
    target_modules=ATTENTION_AND_MLP,
)


def patch_vectors(scene, words: dict[str, torch.Tensor], inputs: str) -> torch.Tensor:
    """[grid^2, d]: what a perfect projector would give the LM for this scene (stage 1b's target)."""
    return _anchor_targets([scene], words, inputs)[0]


def encode(lm, words, inputs: str, items, with_answers: bool):
    """Right-padded input embeddings, attention mask, and per row the answer labels (training) or
    the index of the last prompt position (evaluation)."""
    tokenizer, table = lm.tokenizer, lm.model.get_input_embeddings()
    rows, labels = [], []
    for scene, question in items:
        shown = f"Objects: {describe(scene).answer}." if inputs == "text" else IMAGE
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{shown}\n{question.text}"}],
            add_generation_prompt=True,
            tokenize=False,
        )
        before, _, after = prompt.partition(IMAGE)
        answer = tokenizer(question.answer + tokenizer.eos_token, add_special_tokens=False).input_ids
        ids = [tokenizer(t, add_special_tokens=False).input_ids for t in (before, after)]
        ids.append(answer if with_answers else [])
        with torch.no_grad():
            pieces = [table(torch.tensor(ids[0], dtype=torch.long))]
            if inputs != "text":
                pieces.append(patch_vectors(scene, words, inputs))
            pieces += [table(torch.tensor(i, dtype=torch.long)) for i in ids[1:]]
        rows.append(torch.cat(pieces))
        labels.append([-100] * (len(rows[-1]) - len(ids[2])) + ids[2])
    width = max(len(r) for r in rows)
    embeds = torch.stack([F.pad(r, (0, 0, 0, width - len(r))) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    if with_answers:
        return embeds, mask, torch.tensor([row + [-100] * (width - len(row)) for row in labels])
    return embeds, mask, torch.tensor([len(r) - 1 for r in rows])


@torch.inference_mode()
def evaluate(core, lm, words, inputs: str, items, batch_size: int = 16) -> list[bool]:
    """Per question: is the greedy first answer token the gold word's first token?"""
    core.eval()
    correct = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        embeds, mask, last = encode(lm, words, inputs, chunk, with_answers=False)
        hidden = core.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        predicted = core.lm_head(hidden[torch.arange(len(chunk)), last]).argmax(-1).tolist()
        gold = [lm.tokenizer(q.answer, add_special_tokens=False).input_ids[0] for _, q in chunk]
        correct += [p == g for p, g in zip(predicted, gold, strict=True)]
    core.train()
    return correct


def train(args, stage: StageSpec, inputs: str, held_out) -> list[dict]:
    """One LoRA run on one input form; its held-out accuracy every --eval-every steps."""
    torch.manual_seed(args.seed)
    lm = load_model({"source": "smollm2-135m", "dtype": "float32"})
    if args.layers:
        truncate_layers(lm.model, args.layers)
    words = _word_vectors(lm.model, lm.tokenizer, ANCHOR_WORDS)
    model = get_peft_model(lm.model, LORA)
    core = model.get_base_model()  # its modules carry the LoRA; calling them skips the full-vocab head
    optimizer = StageOptimizer([p for p in model.parameters() if p.requires_grad], stage)
    rng, losses, points = random.Random(f"train:{args.seed}"), [], []
    core.train()
    for step in track(range(1, args.steps + 1), description=f"lookup from {inputs}"):
        items = draw_scenes(rng, args.batch_size, SCENES)
        embeds, mask, labels = encode(lm, words, inputs, items, with_answers=True)
        hidden = core.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[:, :-1]
        where = labels[:, 1:] != -100
        loss = F.cross_entropy(core.lm_head(hidden[where]).float(), labels[:, 1:][where])
        losses.append(optimizer.step(loss))
        if step % args.eval_every == 0 or step == args.steps:
            recent = losses[-25:]
            correct = evaluate(core, lm, words, inputs, held_out)
            points.append(
                {"inputs": inputs, "step": step, "loss": sum(recent) / len(recent), "correct": correct}
            )
            print(f"{inputs} step {step}: loss {points[-1]['loss']:.3f}, accuracy {np.mean(correct):.3f}")
    return points


def per_kind(items, correct: list[bool]) -> dict[str, float]:
    kinds = sorted({q.kind for _, q in items})
    scores = {
        k: float(np.mean([c for c, (_, q) in zip(correct, items, strict=True) if q.kind == k])) for k in kinds
    }
    return scores | {"all": float(np.mean(correct))}


def main() -> int:
    parser = bench_parser(__doc__, "vlm_lookup")
    parser.add_argument(
        "--inputs", nargs="+", choices=["text", "blend", "words"], default=["text", "blend", "words"]
    )
    parser.add_argument(
        "--layers", type=int, default=None, help="keep the LM's first N layers; unset: all 30"
    )
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--questions", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:  # checked before any model loads: warm-up, cosine decay to 0 at the last step, clip 1.0
        stage = StageSpec(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup_steps=args.warmup_steps,
            schedule="cosine",
            max_grad_norm=1.0,
        )
    except ValueError as error:
        parser.error(str(error))
    eval_rng = random.Random("eval")
    held_out = draw_scenes(eval_rng, args.questions, SCENES)
    kinds = sorted({q.kind for _, q in held_out})
    majority = {k: Counter(q.answer for _, q in held_out if q.kind == k).most_common(1)[0][1] for k in kinds}
    counts = Counter(q.kind for _, q in held_out)
    prior = [round(majority[k] / counts[k], 3) for k in kinds] + [
        round(sum(majority.values()) / len(held_out), 3)
    ]
    rows: list[list] = [["majority answer of each kind", "-", "-", *prior, "-"]]
    points: list[dict] = []
    for inputs in args.inputs:  # the table is rewritten after each form: a stopped run keeps the forms done
        for point in train(args, stage, inputs, held_out):
            points.append(point)
            scores = per_kind(held_out, point["correct"])
            low, high = wilson(scores["all"], len(held_out))
            rows.append(
                [point["inputs"], point["step"], round(point["loss"], 3)]
                + [round(scores[k], 3) for k in [*kinds, "all"]]
                + [f"[{low:.3f}, {high:.3f}]"]
            )
        report(args, held_out, kinds, rows, points)
    return 0


def report(args, held_out, kinds: list[str], rows: list[list], points: list[dict]) -> None:
    notes = [
        f"command: `python benchmarks/vlm_lookup.py --inputs {' '.join(args.inputs)} --steps {args.steps} "
        f"--lr {args.lr} --warmup-steps {args.warmup_steps} --batch-size {args.batch_size} "
        f"--questions {args.questions} --seed {args.seed}"
        + (f" --layers {args.layers}`" if args.layers else "`"),
        f"LM: SmolLM2-135M-Instruct, {args.layers or 'all 30'} layers, LoRA r16 (attention and MLP), lr "
        f"{args.lr}, {args.warmup_steps} warm-up steps, cosine, clip 1.0, {args.batch_size} questions a "
        "step, loss on the answer",
        f"{len(held_out)} held-out questions (seed stream 'eval'); accuracy: the greedy first answer token "
        "is the gold word's; loss: mean of the last 25 steps",
        f"machine: {machine()}",
    ]
    headers = ["inputs", "step", "loss", *kinds, "all", "all: 95% CI"]
    results = {"rows": rows, "points": points, "args": vars(args)}
    output = Path(args.output)
    write_report(
        output, "The scene lookup without a tower: what the LM can read", results, headers, rows, notes
    )
    write_table(Path(args.table), (output / "summary.md").read_text())


if __name__ == "__main__":
    raise SystemExit(main())
