"""Convert a published MDLM or MDM-Prime checkpoint into a checkpoint of this package, exactly.

    python examples/convert_checkpoint.py kuleshov-group/mdlm-owt outputs/converted/mdlm-owt
    python examples/convert_checkpoint.py chen-hao-chao/mdm-prime outputs/converted/mdm-prime-l4-owt \\
        --filename text/owt/results_prime_l4_owt/checkpoint.ckpt
    python examples/convert_checkpoint.py path/to/checkpoint.ckpt outputs/converted/local --raw_weights

The source is a local folder or ``.ckpt``, or a Hub repo id (downloaded first; ``--filename`` names a file in it).
MDLM's format is ``config.json`` (``model_type "mdlm"``) with safetensors ``backbone.*`` weights; MDM-Prime's is a
Lightning ``.ckpt`` whose EMA weights are converted (``--raw_weights`` for the raw ones) and whose config gives ℓ and
carry_over. The constant adaLN modulation of the time-independent DiT is folded into plain weights in float64, so
the converted model computes the source's function. Time-conditioned, uniform-state (Duo) and block-causal (BD3-LM)
checkpoints are refused with the reason.

A ``.ckpt`` is a pickle. It is read with a restricted unpickler that builds tensors and plain containers and replaces
everything else (the OmegaConf config, the pickled tokenizer) with inert stubs, so no code in the file runs.
``--allow_unsafe_pickle`` uses Python's full unpickler instead, which RUNS ANY CODE THE FILE NAMES.

The output is a ``save_pretrained`` folder with the GPT-2 tokenizer, ``generation_config.json``, ``conversion.json``
and a model card with a Conversion section (rendered from ``conversion.json``, which a push publishes too);
evaluate it with ``examples/evaluate_ppl.py`` and publish it with ``examples/push_to_hub.py <output> <repo>
--license <licence>``.
"""

from __future__ import annotations

import argparse
import json
import sys

from modeling_mdm_prime.tools.cli import add_card_dataset_argument
from modeling_mdm_prime.tools.convert import CONVERSION_FILE, convert_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="MDLM folder or Hub id, or an MDM-Prime .ckpt (or its Hub repo with --filename)")
    parser.add_argument("output_dir", help="new or empty folder for the converted checkpoint")
    parser.add_argument("--filename", default=None, help="file inside the source repo/folder, e.g. a .ckpt path")
    parser.add_argument(
        "--revision", default=None, help="Hub revision of the source (pin a commit for reproducibility)"
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer folder or Hub id (default: 'gpt2' from the Hub; offline, a local GPT-2 tokenizer folder)",
    )
    parser.add_argument(
        "--embedding_dropout", type=float, default=0.0, help="dropout on the embedding (the source DiT has none: 0)"
    )
    parser.add_argument(
        "--raw_weights", action="store_true", help=".ckpt: convert state_dict instead of the EMA weights"
    )
    parser.add_argument(
        "--allow_unsafe_pickle",
        action="store_true",
        help="read a .ckpt with Python's full unpickler. DANGEROUS: a pickle can run any code on this machine as you; "
        "use only for files whose origin you trust, and only if the default restricted loader fails",
    )
    card = parser.add_argument_group("model card")
    card.add_argument("--license", default=None, help="licence of the source (default: the known one of the source)")
    add_card_dataset_argument(card)
    card.add_argument("--training_data", default=None, help="description of the source's training data")
    card.add_argument("--model_id", default=None, help="id the card's usage snippet loads (default: output_dir)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        target = convert_checkpoint(
            args.source,
            args.output_dir,
            filename=args.filename,
            revision=args.revision,
            tokenizer=args.tokenizer,
            embedding_dropout=args.embedding_dropout,
            use_ema=not args.raw_weights,
            allow_unsafe_pickle=args.allow_unsafe_pickle,
            license=args.license,
            datasets=tuple(args.card_datasets),
            training_data=args.training_data,
            model_id=args.model_id,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    record = json.loads((target / CONVERSION_FILE).read_text())
    print(
        f"Converted {args.source} ({record['source']['weights']}, ℓ = {record['num_sub_tokens']}, "
        f"{record['num_parameters']:,} parameters) to {target}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
