"""The ``fastllava`` command: ``chat`` (one question, or an interactive multi-turn chat), ``serve``, ``train``,
``train-demo`` and ``eval``. With no --model, chat uses the demo model bundled in the package."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

DEMO_DIR = Path(__file__).parent / "demo"
DEMO_MODEL = DEMO_DIR / "model"
DEMO_IMAGE = DEMO_DIR / "image.png"

HELP_TEXT = """commands: /image PATH_OR_URL  talk about another image (starts a new conversation)
          /reset                start over with the same image
          /quit or Ctrl-D       leave"""


def load_model_and_processor(model_path: str | None, dtype: str = "auto", device: str | None = None,
                             quantize: str | None = None) -> tuple[Any, Any]:
    from fastllava.models.llava import LlavaForConditionalGeneration
    from fastllava.processing import AutoProcessor

    path = model_path or str(DEMO_MODEL)
    if model_path is None and not (DEMO_MODEL / "config.json").is_file():
        raise SystemExit("the bundled demo model is missing from this installation; pass --model DIR_OR_HUB_ID")
    # quantize: "int8" / "int4" (or anything fastllava.QuantizationConfig accepts); None keeps full precision
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, device_map=device or "cpu",
                                                          quantization_config=quantize or None)
    return model, AutoProcessor.from_pretrained(path)


def _chat(args: argparse.Namespace) -> int:
    import torch

    from fastllava.chat import ChatSession
    from fastllava.generation.streaming import TextStreamer
    from fastllava.image_loading import load_image

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, processor = load_model_and_processor(args.model, args.dtype, args.device, args.quantize)
    image_source = args.image or (str(DEMO_IMAGE) if args.model is None else None)
    try:
        image = load_image(image_source) if image_source else None
    except Exception as error:  # noqa: BLE001 - any unreadable image is reported, not a traceback
        print(f"error: cannot read image {image_source}: {error}", file=sys.stderr)
        return 2
    chat = ChatSession(model, processor, image)
    overrides = {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature > 0}
    if args.temperature > 0:
        overrides["temperature"] = args.temperature
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None

    def answer(question: str) -> None:
        streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        chat.ask(question, streamer=streamer, generator=generator, **overrides)

    if args.question:
        answer(" ".join(args.question))
        return 0
    print(f"fastllava chat — model: {args.model or 'bundled demo'}, image: {image_source or 'none'}")
    print(HELP_TEXT)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            chat.reset()
            print("(conversation reset)")
            continue
        if line.startswith("/image"):
            source = line[len("/image"):].strip()
            try:
                chat.reset(load_image(source))
                print(f"(new conversation about {source})")
            except Exception as error:  # noqa: BLE001
                print(f"error: cannot read image {source}: {error}")
            continue
        if line.startswith("/"):
            print(HELP_TEXT)
            continue
        print("llava> ", end="", flush=True)
        try:
            answer(line)
        except ValueError as error:
            print(f"\nerror: {error}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastllava", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    chat = commands.add_parser("chat", help="ask about an image (interactive without a question)")
    chat.add_argument("question", nargs="*", help="the question; omit it for an interactive chat")
    chat.add_argument("--model", help="checkpoint directory or hub id (default: the bundled demo model)")
    chat.add_argument("--image", help="image path or URL (default with the demo model: its bundled image)")
    chat.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    chat.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto")
    chat.add_argument("--quantize", choices=["int8", "int4"], default=None,
                      help="weight-only quantization of the text model")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    chat.add_argument("--seed", type=int, default=None)
    chat.set_defaults(run=_chat)
    for name, (_, _, help_text) in DELEGATED.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


# Commands with their own argument parsers, in the modules that implement them.
DELEGATED = {
    "train": ("fastllava.train.trainer", "train_main", "train a LLaVA (feature alignment / instruction tuning)"),
    "train-demo": ("fastllava.train.demo", "demo_main", "rebuild the bundled demo model from scratch"),
    "eval": ("fastllava.eval.cli", "eval_main", "exact-match accuracy of a model on LLaVA-format QA data"),
    "serve": ("fastllava.server.cli", "serve_main", "OpenAI-compatible HTTP server with a web chat page"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        import importlib

        module, function, _ = DELEGATED[argv[0]]
        return getattr(importlib.import_module(module), function)(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
