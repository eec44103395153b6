"""Compute the querybank biases of an embedding folder, for `3_inference_search.sh --querybank`:
`./clipsearch querybank --emb_path <folder> --load_model <model> --dataset_path <captions> --split train`."""
from __future__ import annotations

import argparse
import sys

from clipsearch.cli.common import (
    DEFAULT_DATASET,
    DEFAULT_EMB_PATH,
    CommandParser,
    UserError,
    add_column_args,
    model_for,
    positive_float,
    positive_int,
    run_command,
)
from clipsearch.cli.index import check_emb_path
from clipsearch.cli.train_args import check_dataset
from clipsearch.model_reference import HELP as LOAD_MODEL_HELP
from clipsearch.model_reference import check_model_reference

EPILOG = """\
Each image's bias is -log(mean over the bank of exp(t * cosine)) / t: images close to many of the
bank's captions (hubs, which answer queries they do not match) are lowered. Search adds it to
the cosine of text queries, at no cost per query. The bank should hold captions like the
queries to come, e.g. the training captions of the model. Rebuild after the shards change:
search refuses a querybank computed for other rows or another model.
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = CommandParser(prog="./clipsearch querybank", description=__doc__, epilog=EPILOG)
    parser.add_argument("--emb_path", default=DEFAULT_EMB_PATH, help="folder of embedding shards the biases are for")
    parser.add_argument("--load_model", default=None, help=LOAD_MODEL_HELP + " (default: the model that encoded --emb_path, as its model.json records, else models/latest/best.ckpt)")
    parser.add_argument("--dataset_path", default=DEFAULT_DATASET, help="dataset folder whose captions make the bank")
    parser.add_argument("--split", default="train", help="table of --dataset_path whose captions make the bank")
    add_column_args(parser)
    parser.add_argument("--size", type=positive_int, default=None,
                        help="captions to use, drawn at random when the table has more (default: 50000)")
    parser.add_argument("--temperature", type=positive_float, default=None,
                        help="inverted-softmax temperature (default: the model's learnt logit scale, at most 100)")
    args = parser.parse_args(argv)
    check_emb_path(args.emb_path)
    args.load_model = model_for(args.emb_path, args.load_model)
    check_model_reference(args.load_model)
    check_dataset(args.dataset_path, args.split, shards_allowed=False,
                  image_column=args.image_column, caption_column=args.caption_column)
    return args


def main(argv: list[str] | None = None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from clipsearch.durable import FolderLock
    from clipsearch.querybank import QUERYBANK_FILE

    # One build per folder: a second is refused in one line that names the first.
    with FolderLock(args.emb_path, QUERYBANK_FILE, "a querybank build"):
        return build(args)


def build(args: argparse.Namespace):
    from clipsearch import querybank
    from clipsearch.checkpoint import model_fingerprint
    from clipsearch.models.released import load_model
    from clipsearch.sample_data import prepare_default_sample
    from clipsearch.search import EmbeddingMismatchError, check_encoded_with
    from clipsearch.store import load_collection

    prepare_default_sample(args.dataset_path)  # the default dataset is generated on first use
    try:
        collection = load_collection(args.emb_path)
        bundle = load_model(args.load_model)
        fingerprint = model_fingerprint(bundle)
        check_encoded_with(collection.model, args.load_model, fingerprint, args.emb_path)
        if collection.dim != bundle.embed_dim:
            raise EmbeddingMismatchError(f"{args.emb_path} holds {collection.dim}-d embeddings but {args.load_model} "
                                         f"makes {bundle.embed_dim}-d ones")
        captions = querybank.bank_captions(args.dataset_path, args.split, args.size or querybank.DEFAULT_BANK_SIZE,
                                           image_column=args.image_column, caption_column=args.caption_column)
    except (FileNotFoundError, ValueError) as error:
        raise UserError(str(error)) from None
    bank_embeddings = querybank.encode_bank(bundle, captions)
    temperature = args.temperature or querybank.model_temperature(bundle.model)
    bank = querybank.QueryBank(
        bias=querybank.hub_bias(collection.embeddings, bank_embeddings, temperature),
        temperature=temperature,
        order_fingerprint=collection.order_fingerprint,
        model_fingerprint=fingerprint,
        source=f"{args.dataset_path} {args.split}, {len(captions)} captions",
    )
    path = bank.save(args.emb_path)
    print(f"wrote querybank biases of {len(collection.paths):,} images to {path} ({bank.source}, "
          f"temperature {temperature:.1f}); search with 3_inference_search.sh --querybank")
    return bank


if __name__ == "__main__":
    run_command(main)
