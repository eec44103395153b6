"""Pretrain "our" CLIP: a pretrained HuggingFace text model and a pretrained timm image model."""
from __future__ import annotations

from clipsearch.cli.common import drop_rate, run_command
from clipsearch.cli.train_args import TrainingDoor, VariantDefaults

# clipsearch.models.image_tower's default, named here: importing it would load torch before parsing
# (tests/test_models.py checks that the two agree).
DEFAULT_IMAGE_MODEL = "tf_efficientnet_lite0"


def add_model_args(model) -> None:
    model.add_argument("--pretrain_text", default=None,
                       help="HuggingFace text model: hub id (e.g. bert-base-uncased) or local folder "
                            "(default: the packaged all-MiniLM-L6-v2, offline)")
    model.add_argument("--pretrain_image", default=DEFAULT_IMAGE_MODEL,
                       help="timm image model name (e.g. resnet50); weights from --image_weights, the packaged file, or timm's hub")
    model.add_argument("--image_weights", default=None, help="local .pth/.safetensors file or folder with the image tower's weights")
    model.add_argument("--text_pooling", default="mean", choices=("mean", "cls"), help="how token states become one caption vector")
    model.add_argument("--embed_dim", type=int, default=256, help="size of the shared embedding space")
    model.add_argument("--text_length", type=int, default=64, help="caption tokens kept (context length)")
    model.add_argument("--image_resolution", type=int, default=None,
                       help="input image size (default: the timm model's; on the generated sample data, its 96 px)")
    model.add_argument("--image_drop_path", type=drop_rate, default=0.0,
                       help="stochastic depth in the trained image stages: residual blocks skipped at random, at "
                            "a rate rising with depth to this value (timm's drop_path_rate; 0: off). A "
                            "regulariser for small datasets; the locked stages and their cache are unaffected")
    model.add_argument("--train_resolution", type=int, default=None,
                       help="train on crops of this size, encode at --image_resolution (default: the same). A CNN "
                            "tower trained below its test size is cheaper per step and scores better at the larger "
                            "test size (FixRes, Touvron et al. 2019)")


def complete(args) -> None:
    if args.image_resolution is None:
        from clipsearch.sample_data import sample_image_size

        args.image_resolution = sample_image_size(args.dataset_path)


def variant(args) -> str:
    tag = f"our-{args.pretrain_image}-{args.image_resolution or 'default'}px"
    return tag + (f"-train{args.train_resolution}px" if args.train_resolution else "")


DOOR = TrainingDoor(
    __doc__,
    # The towers train at --lr unless --tower_lr says otherwise: on the sample data, 150 steps reach
    # dev text->image R@1 87.0 with towers at 5e-4 against 58.8 with towers at 5e-5. 100 steps (79.1,
    # R@5 99.7) keep the README's first command near its 5 minutes: a step costs about 2 s on 2 cores,
    # and neither smaller training crops nor a locked text tower bought as much (BENCHMARKS.md).
    VariantDefaults(lr=5e-4, max_steps=100),
    add_model_args,
    variant,
    build="build_pretrained_towers",
    pretrained_towers=True,
    complete=complete,
)
parse_args, main = DOOR.parse_args, DOOR.main

if __name__ == "__main__":
    run_command(main)
