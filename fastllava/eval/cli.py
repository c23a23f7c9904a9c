"""``fastllava eval``: a model's exact-match accuracy on LLaVA-format QA data, overall and per question type.

Each question is asked on its own, with its image, through the checkpoint's chat template and greedy
``generate``; the runner scores the replies. ``--generate-heldout N --seed S`` first writes N freshly generated
held-out synthetic questions (phrasings and renderings never used in training) and evaluates on them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any, Callable


def model_answer_fn(model: Any, processor: Any, max_new_tokens: int = 32) -> Callable[[Any, str], str]:
    """answer_fn(image, question) -> the model's greedy answer text."""

    def answer(image: Any, question: str) -> str:
        content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": question}]
        inputs = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                               tokenize=True, return_dict=True, return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    return answer


def eval_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastllava eval", description=__doc__)
    parser.add_argument("--model", default=None, help="checkpoint directory or hub id (default: bundled demo model)")
    parser.add_argument("--data", help="LLaVA-format JSON file with the questions")
    parser.add_argument("--image-root", default=None, help="folder the records' image paths are relative to")
    parser.add_argument("--generate-heldout", type=int, default=0, metavar="N",
                        help="evaluate on N freshly generated held-out synthetic images instead of --data")
    parser.add_argument("--seed", type=int, default=987654, help="seed of the generated held-out set")
    parser.add_argument("--limit", type=int, default=None, help="ask at most this many questions")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None)
    parser.add_argument("--json", dest="json_out", default=None, help="also write the full result to this file")
    parser.add_argument("--show-mistakes", type=int, default=5)
    args = parser.parse_args(argv)

    from fastllava.cli import load_model_and_processor
    from fastllava.eval.runner import evaluate, format_report, load_llava_json

    if not args.data and not args.generate_heldout:
        parser.error("pass --data FILE or --generate-heldout N")
    model, processor = load_model_and_processor(args.model, args.dtype, quantize=args.quantize)
    with tempfile.TemporaryDirectory() as scratch:
        if args.generate_heldout:
            from fastllava.train.synthetic_data import generate_dataset

            data = generate_dataset(scratch, args.generate_heldout, seed=args.seed, split="heldout")
            image_root = Path(scratch)
        else:
            data = Path(args.data)
            image_root = Path(args.image_root) if args.image_root else data.parent
        records = load_llava_json(data)
        result = evaluate(records, image_root, model_answer_fn(model, processor, args.max_new_tokens), limit=args.limit)
    print(format_report(result, max_mistakes=args.show_mistakes))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0
