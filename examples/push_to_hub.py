"""Publish a trained checkpoint to the Hugging Face Hub: weights, config, code, tokenizer or samples, and a model card.

    python examples/push_to_hub.py outputs/pretrain/final your-name/mdm-prime-shakespeare --private
    python examples/push_to_hub.py outputs/pretrain/final your-name/mdm-prime-shakespeare --revision v2 \\
        --commit_message "Retrained for 20k steps"
    python examples/push_to_hub.py outputs/pretrain/final your-name/mdm-prime-shakespeare --create_pr
    python examples/push_to_hub.py outputs/pretrain/final --save_to staged/   # dry run: write what would be pushed
    python examples/push_to_hub.py outputs/train_images/final your-name/mdm-prime-digits   # an image model

The checkpoint folder is what ``examples/pretrain.py`` saves (``<output_dir>/final``), or any ``save_pretrained``
folder with the tokenizer. It is checked before anything is sent; pickles are refused (by name and by content). Only
the files of the model are published (docs/guides/publishing.md, "What is uploaded"); the rest of the folder is left
out and listed, and ``--include PATTERN`` publishes more. Put ``eval_results.json`` in it first
(``examples/evaluate_ppl.py --write_results``) to publish the held-out valid-bound perplexity in the card's
metadata. An image checkpoint (``examples/train_images.py``'s ``final/``) needs no tokenizer: its ``samples.png``
and ``metrics.json`` are published, with ``examples/evaluate_images.py``'s ``eval_images.json`` when present (bits
per dimension, FID or classifier Fréchet distance in the card), and its card has the sample grid and no
text-generation tag. Publishing again to the same repository adds a commit with what changed. A failed push changes
nothing: run the same command again.

The token comes from ``--token``, ``HF_TOKEN`` or ``hf auth login``; ``HF_ENDPOINT`` selects another Hub.
"""

from __future__ import annotations

import argparse
import logging
import sys

from modeling_mdm_prime.tools import HubPublishError, publish_checkpoint, stage_checkpoint
from modeling_mdm_prime.tools.cli import add_card_dataset_argument


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "checkpoint_dir",
        help="save_pretrained folder: a text model with its tokenizer (outputs/pretrain/final) or an image model "
        "(outputs/train_images/final)",
    )
    parser.add_argument("repo_id", nargs="?", help="'namespace/name', or 'name' for your own namespace")
    hub = parser.add_argument_group("Hub")
    hub.add_argument("--private", action="store_true", help="create the repository private")
    hub.add_argument("--revision", default=None, help="branch to commit to (default main; created if needed)")
    hub.add_argument("--commit_message", default=None, help="commit title (default: version and valid bound)")
    hub.add_argument("--commit_description", default=None, help="commit body")
    hub.add_argument("--create_pr", action="store_true", help="open a pull request instead of committing")
    hub.add_argument("--new_repo", action="store_true", help="fail if the repository already exists")
    hub.add_argument("--token", default=None, help="Hub token with write access (default: HF_TOKEN or hf auth login)")
    card = parser.add_argument_group("model card")
    add_card_dataset_argument(card)
    card.add_argument("--language", action="append", default=[], help="ISO 639-1 code, e.g. en (repeatable)")
    card.add_argument("--license", default=None, help="Hub license id, e.g. apache-2.0")
    card.add_argument("--example_prompt", default="The", help="prompt of the card's generation example (text models)")
    card.add_argument("--training_data", default=None, help="description of the training data for the card")
    card.add_argument("--card_template", default=None, help="Jinja2 template (default: the package's own)")
    parser.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="PATTERN",
        help="also publish these files of the folder (name or glob, repeatable); others outside the model are left out",
    )
    parser.add_argument(
        "--save_to",
        default=None,
        metavar="DIR",
        help="write the folder that would be pushed into DIR (new or empty) and push nothing",
    )
    args = parser.parse_args(argv)
    if args.repo_id is None and args.save_to is None:
        parser.error("give a repo_id to push to, or --save_to DIR for a dry run")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Show the warnings of the publishing code (files left out, code that differs from the package) as plain lines.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    logging.getLogger("modeling_mdm_prime").setLevel(logging.INFO)
    card_options = {
        "datasets": args.card_datasets,
        "language": args.language,
        "license": args.license,
        "example_prompt": args.example_prompt,
        "training_data": args.training_data,
    }
    if args.save_to is not None:
        try:
            target = stage_checkpoint(
                args.checkpoint_dir,
                args.save_to,
                model_id=args.repo_id,
                revision=args.revision,
                template=args.card_template,
                extra_files=args.include,
                **card_options,
            )
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"Wrote the folder to publish to {target}; nothing was pushed.")
        return 0
    try:
        info = publish_checkpoint(
            args.checkpoint_dir,
            args.repo_id,
            token=args.token,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            commit_description=args.commit_description,
            create_pr=args.create_pr,
            exist_ok=not args.new_repo,
            card_template=args.card_template,
            extra_files=args.include,
            **card_options,
        )
    except (HubPublishError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Published {args.checkpoint_dir} to {info.repo_url}")
    print(f"commit: {info.commit_url}")
    if info.pr_url:
        print(f"pull request: {info.pr_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
