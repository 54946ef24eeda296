"""Watch one generation unmask: a live view in the terminal while it runs, then the whole history as one
self-contained HTML file (step slider, play button) and an animated GIF.

    python examples/visualize_unmasking.py --prompt "ROMEO:" --max_new_tokens 48 --output_dir outputs/unmasking
    python examples/visualize_unmasking.py --template "ROMEO: [MASK:6] my love, [MASK:6]." --no_live

Partially revealed tokens (some of their ℓ digits known) are drawn as their digits and the number of tokens still
consistent with them; revealed tokens are coloured by the step that completed them (blue early, red late).
The default model is the adapted SmolLM2 when built (docs/guides/adaptation.md), else the tiny reference (ℓ = 2).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from modeling_mdm_prime.tools.cli import add_demo_model_argument, option_strings
from modeling_mdm_prime.tools.serving import infill_template
from modeling_mdm_prime.tools.unmasking_view import RichUnmaskingStreamer, UnmaskingRecorder

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_demo_model_argument(p, REPO)
    p.add_argument("--prompt", default="ROMEO:", help="text to continue")
    p.add_argument("--template", default=None, help="text with [MASK] / [MASK:n] holes to fill (instead of --prompt)")
    p.add_argument(*option_strings("max_new_tokens"), type=int, default=48, help="tokens to generate after --prompt")
    p.add_argument(
        *option_strings("num_steps"), type=int, default=None, help="sampler steps T (default: one per token)"
    )
    p.add_argument("--strategy", default="ancestral", choices=["ancestral", "confidence", "threshold"],
                   help="sampling strategy")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument(*option_strings("output_dir"), type=Path, default=REPO / "outputs" / "unmasking",
                   help="where unmasking.html and unmasking.gif go")  # fmt: skip
    p.add_argument(*option_strings("gif_every"), type=int, default=1, help="a GIF frame every N steps")
    p.add_argument(*option_strings("no_live"), action="store_true", help="no live terminal view")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    model = AutoModel.from_pretrained(args.model_name_or_path, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    if args.template is not None:
        template = infill_template(tokenizer, args.template)
        inputs = {"input_ids": torch.tensor([template.ids]), "infill_mask": torch.tensor([template.holes])}
    else:
        inputs = {"input_ids": tokenizer(args.prompt, return_tensors="pt")["input_ids"],
                  "max_new_tokens": args.max_new_tokens}  # fmt: skip
    recorder_class = UnmaskingRecorder if args.no_live else RichUnmaskingStreamer
    recorder = recorder_class(model.codec, tokenizer)
    out = model.generate(**inputs, streamer=recorder, seed=args.seed, strategy=args.strategy,
                         num_steps=args.num_steps, return_dict_in_generate=True)  # fmt: skip
    args.output_dir.mkdir(parents=True, exist_ok=True)
    title = (
        f"{Path(args.model_name_or_path).name}: ℓ = {model.config.num_sub_tokens}, {args.strategy}, seed {args.seed}"
    )
    page = recorder.to_html(args.output_dir / "unmasking.html", title=title)
    gif = recorder.to_gif(args.output_dir / "unmasking.gif", every=args.gif_every)
    print(tokenizer.decode(out.sequences[0], skip_special_tokens=True))
    print(f"{out.num_steps} steps, {out.nfe} network calls; wrote {page} and {gif}")


if __name__ == "__main__":
    main()
