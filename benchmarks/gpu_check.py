"""The checks only CUDA GPUs can make: the training doors under AMP, DDP against gloo, encoding on every GPU, search.

    bash benchmarks/gpu_check.sh                  # the whole check, benchmarks included (see benchmarks/README.md)
    python benchmarks/gpu_check.py --work_dir W   # these checks alone
    python benchmarks/gpu_check.py --work_dir W --cpu_dry_run   # the same steps on the CPU, to try the script

Each check prints one line, PASS, FAIL or SKIP with the figures behind it, and the run ends with
a summary (as benchmarks/results/gpu_check.json and the "GPU check" section of BENCHMARKS.md with
--report); the exit status is 1 when a check failed. Everything runs on generated data and tiny
models made here (no download, no packaged weights), in --work_dir:

- every training door (pretrain_openai, finetune_openai, our) for a few steps in 16-mixed and
  bf16-mixed: losses finite, last.ckpt and best.ckpt written and finite, and a run killed after
  its step-3 checkpoint and resumed ends with the weights of the run that was never stopped;
- with 2 or more GPUs, DDP on 2 GPUs (NCCL, fp32, TF32 off) against the same run on 2 CPU
  processes (gloo): the weight changes agree;
- the encode CLI with --devices = the GPU count: every image in exactly one shard, embeddings as
  the CPU computes them, peak memory per GPU and the processes seen on each (one per GPU: an
  encoding rank must not open a context on GPU 0);
- the search CLI with --fp16 against fp32 on those shards.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import common

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "package"), str(REPO)]

DOORS = ("pretrain_openai", "finetune_openai", "our")
PRECISIONS = ("16-mixed", "bf16-mixed")
STEPS, KILLED_AFTER, CHECKPOINT_EVERY = 6, 4, 3
# A resumed run replays the stopped one's batches, seeds and optimiser state; on a GPU some kernels
# (attention's backward among them) add in no fixed order, so equal means equal to rounding, which
# Adam can amplify for near-zero gradients: ||resumed - uninterrupted|| against what the resumed
# steps changed, ||uninterrupted - the checkpoint resumed from|| (exactly 0 on the CPU).
RESUME_TOLERANCE = 0.01
# DDP on GPUs against gloo on CPUs: ||change on GPUs - change on CPUs|| / ||change on CPUs||.
DDP_TOLERANCE = 0.05
ENCODE_IMAGES_PER_GPU = 768
SUBPROCESS_TIMEOUT = 240


class Checks:
    """Collects one line per check; a check that raises is a FAIL with the error's last line."""

    def __init__(self):
        self.results: list[tuple[str, str, str]] = []
        self.header = common.run_header()

    def run(self, name: str, check: Callable[[], str | None]) -> None:
        started = time.perf_counter()
        try:
            detail = check()
            status = "SKIP" if isinstance(detail, Skip) else "PASS"
        except Exception as error:  # a failed check is reported, and the others still run
            traceback.print_exc()
            status, detail = "FAIL", f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
        line = (status, name, f"{detail} ({time.perf_counter() - started:.0f} s)")
        self.results.append(line)
        print(f"{line[0]} {line[1]}: {line[2]}", flush=True)

    def summary(self, argv: list[str] | None, report: bool) -> int:
        print("\n== summary ==")
        for status, name, detail in self.results:
            print(f"{status} {name}: {detail}")
        failed = sum(status == "FAIL" for status, _, _ in self.results)
        skipped = sum(status == "SKIP" for status, _, _ in self.results)
        results = {
            **self.header,
            "checks": [{"status": status, "check": name, "detail": detail} for status, name, detail in self.results],
            "load_average_end": common.load_average(),
            "command": common.command_line("gpu_check.py", argv),
            "findings": [f"- {len(self.results)} checks: {failed} failed, {skipped} skipped."],
        }
        table = common.markdown_table(["check", "result", "figures"],
                                      [[name, status, detail] for status, name, detail in self.results], "lll")
        common.publish("gpu_check", results, common.report_section("GPU check", results, ["", *table]), report)
        return 1 if failed else 0


class Skip(str):
    """A check's answer when the machine cannot run it (one GPU for a two-GPU check)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", type=Path, required=True, help="scratch folder (data, runs, shards)")
    parser.add_argument("--cpu_dry_run", action="store_true",
                        help="run the steps on the CPU (bf16-mixed only, DDP as two gloo runs), to try the script")
    parser.add_argument("--only", default=None, help="comma-separated subset of: train, ddp, encode, search")
    common.add_report_flags(parser)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Inputs: data and the towers the doors start from, all made here
# ---------------------------------------------------------------------------------------------


def make_inputs(work: Path) -> dict:
    import timm
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    from clipsearch.models import build_from_spec
    from clipsearch.models.openai_clip import openai_clip_spec
    from clipsearch.sample_data import ensure_sample_dataset

    dataset = ensure_sample_dataset(work / "sample", num_train=96, num_dev=24, image_size=64)
    inputs = {"dataset": dataset}
    torch.manual_seed(0)
    openai_weights = work / "towers" / "ViT-Tiny-16.pt"
    openai_weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_from_spec(openai_clip_spec("ViT-Tiny-16")).model.state_dict(), openai_weights)
    inputs["openai_weights"] = openai_weights
    # "our" door: a randomly initialised EfficientNet-Lite0 and a 2-layer BERT with a vocabulary of
    # the sample captions' words, saved as the local files the door takes.
    image_weights = work / "towers" / "tf_efficientnet_lite0.pth"
    torch.save(timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict(), image_weights)
    text_folder = work / "towers" / "tiny-bert"
    words = sorted({word for line in (dataset / "train.tsv").read_text().lower().split("\n")[1:]
                    for word in line.split("\t")[-1].replace(".", " ").split()})
    vocabulary = text_folder / "vocab.txt"
    text_folder.mkdir(parents=True, exist_ok=True)
    vocabulary.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(str(vocabulary)).save_pretrained(text_folder)
    BertModel(BertConfig(vocab_size=len(words) + 5, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128, max_position_embeddings=64)).save_pretrained(text_folder)
    inputs["image_weights"], inputs["text_folder"] = image_weights, text_folder
    return inputs


def door_flags(door: str, inputs: dict) -> list[str]:
    if door == "pretrain_openai":
        return ["--pretrain_clip=ViT-Tiny-16", "--image_resolution=64"]
    if door == "finetune_openai":
        return ["--finetune_clip=ViT-Tiny-16", f"--clip_checkpoint={inputs['openai_weights']}"]
    return ["--pretrain_image=tf_efficientnet_lite0", f"--image_weights={inputs['image_weights']}",
            f"--pretrain_text={inputs['text_folder']}", "--image_resolution=64", "--text_length=16", "--embed_dim=64"]


def run_flags(inputs: dict, work: Path, run_name: str, accelerator: str, precision: str, devices: int = 1) -> list[str]:
    return [f"--dataset_path={inputs['dataset']}", f"--models_dir={work / 'models'}", f"--logs_dir={work / 'logs'}",
            f"--run_name={run_name}", f"--max_steps={STEPS}", "--batch_size=16", "--num_workers=2", "--warmup_steps=1",
            f"--val_check_interval={CHECKPOINT_EVERY}", f"--checkpoint_every_steps={CHECKPOINT_EVERY}",
            "--log_every_n_steps=1", f"--accelerator={accelerator}", f"--devices={devices}", f"--precision={precision}"]


def door_main(door: str):
    import importlib

    return importlib.import_module(f"clipsearch.cli.{door if door != 'our' else 'pretrain_our'}").main


# ---------------------------------------------------------------------------------------------
# Training doors under AMP: finite, checkpointed, resumable
# ---------------------------------------------------------------------------------------------


class _Killed(Exception):
    pass


def record_losses(losses: list[float]):
    """Wrap the training step so a run in this process reports every step's loss."""
    from clipsearch import lightning_module

    step = lightning_module.CLIPModule.training_step

    def recording_step(self, batch, batch_idx):
        loss = step(self, batch, batch_idx)
        losses.append(float("nan") if loss is None else loss.detach().float().item())
        return loss

    lightning_module.CLIPModule.training_step = recording_step
    return lambda: setattr(lightning_module.CLIPModule, "training_step", step)


def killed_after(step_count: int):
    """Stop the run in this process as if it died right after training step `step_count`."""
    from clipsearch import train

    original = train.ReproducibleSteps.on_train_batch_end

    def die(self, trainer, *args):
        original(self, trainer, *args)
        if trainer.global_step == step_count:
            raise _Killed

    train.ReproducibleSteps.on_train_batch_end = die
    return lambda: setattr(train.ReproducibleSteps, "on_train_batch_end", original)


def floating_state(run_dir: Path, name: str = "last.ckpt") -> dict:
    from clipsearch.checkpoint import read_checkpoint

    return {key: value.float() for key, value in read_checkpoint(run_dir / name)["state_dict"].items()
            if value.is_floating_point()}


def check_door(door: str, precision: str, inputs: dict, work: Path, accelerator: str) -> str:
    import torch

    main = door_main(door)
    flags = door_flags(door, inputs)
    tag = f"{door}-{precision}"
    losses: list[float] = []
    restore = record_losses(losses)
    try:
        whole = main([*flags, *run_flags(inputs, work, f"{tag}-whole", accelerator, precision)])
    finally:
        restore()
    if whole.global_step != STEPS:
        raise AssertionError(f"{whole.global_step} steps ran, not {STEPS}")
    if len(losses) != STEPS or not all(math.isfinite(loss) for loss in losses):
        raise AssertionError(f"losses {losses}")
    for name in ("last.ckpt", "best.ckpt"):
        state = floating_state(whole.run_dir, name)
        if not all(torch.isfinite(value).all() for value in state.values()):
            raise AssertionError(f"{name} holds non-finite weights")
    stopped = [*flags, *run_flags(inputs, work, f"{tag}-killed", accelerator, precision)]
    restore = killed_after(KILLED_AFTER)
    try:
        main(stopped)
        raise AssertionError("the run meant to be killed finished")
    except _Killed:
        pass
    finally:
        restore()
    resumed_from = floating_state(work / "models" / f"{tag}-killed")
    resumed = main(stopped)
    if resumed.start_step != CHECKPOINT_EVERY or resumed.global_step != STEPS:
        raise AssertionError(f"resumed from step {resumed.start_step} to {resumed.global_step}")
    expected, got = floating_state(whole.run_dir), floating_state(resumed.run_dir)
    largest = max((got[key] - value).abs().max().item() for key, value in expected.items())
    relative = relative_gap(got, expected, resumed_from)
    if not relative <= RESUME_TOLERANCE:
        raise AssertionError(f"the resumed run ends {relative:.2e} of its steps' change away from the uninterrupted one "
                             f"(max |difference| {largest:.2e})")
    return (f"{STEPS} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, last.ckpt and best.ckpt finite; killed after "
            f"step {KILLED_AFTER}, resumed from {resumed.start_step}: {relative:.1e} of the change away from the "
            f"uninterrupted run (max |difference| {largest:.2e})")


def relative_gap(got: dict, expected: dict, start: dict) -> float:
    """||got - expected|| / ||expected - start|| over every weight: how far apart two ends are, measured
    against how far the expected one travelled."""
    gap = math.sqrt(sum(((got[key] - expected[key]) ** 2).sum().item() for key in start))
    travelled = math.sqrt(sum(((expected[key] - value) ** 2).sum().item() for key, value in start.items()))
    if travelled == 0:
        raise AssertionError("the weights did not change")
    return gap / travelled


# ---------------------------------------------------------------------------------------------
# DDP on two GPUs against two gloo processes
# ---------------------------------------------------------------------------------------------


def door_process(flags: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "src_openai_pretrain" / "main.py"), *flags]
    completed = subprocess.run(command, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                               timeout=SUBPROCESS_TIMEOUT, cwd=REPO)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command[1:3])} ... failed:\n{completed.stderr[-3000:]}")
    return completed


def initial_weights(flags: list[str]) -> dict:
    """The weights a run with these flags starts from: the door seeds, then builds."""
    import lightning as L

    from clipsearch import variants
    from clipsearch.cli.pretrain_openai import DOOR

    config = DOOR.parse_args(flags)
    L.seed_everything(config.seed, workers=True, verbose=False)
    model = getattr(variants, DOOR.build)(config.model_args).model
    return {f"model.{key}": value.float() for key, value in model.state_dict().items() if value.is_floating_point()}


def check_ddp(inputs: dict, work: Path, gpus: int, cpu_dry_run: bool) -> str:
    if gpus < 2 and not cpu_dry_run:
        return Skip(f"{gpus} GPU: DDP needs 2")
    flags = door_flags("pretrain_openai", inputs)
    gpu_run = [*flags, *run_flags(inputs, work, "ddp-gpu", "cpu" if cpu_dry_run else "gpu", "32", devices=2),
               "--strategy=ddp"]
    cpu_run = [*flags, *run_flags(inputs, work, "ddp-cpu", "cpu", "32", devices=2), "--strategy=ddp"]
    # TF32 would round the GPU's convolutions and products to 10-bit mantissas: compare fp32 with fp32.
    door_process(gpu_run, {"NVIDIA_TF32_OVERRIDE": "0"})
    door_process(cpu_run)
    start = initial_weights(gpu_run)
    on_gpus, on_cpus = floating_state(work / "models" / "ddp-gpu"), floating_state(work / "models" / "ddp-cpu")
    relative = relative_gap(on_gpus, on_cpus, start)
    if not relative <= DDP_TOLERANCE:  # also false for NaN
        raise AssertionError(f"weight changes differ by {relative:.3f} of their size (allowed {DDP_TOLERANCE})")
    first = "2 more CPU processes (dry run)" if cpu_dry_run else "2 GPUs (NCCL)"
    return f"{STEPS} steps on {first} and on 2 CPU processes (gloo): weight changes differ by {relative:.4f} of their size"


# ---------------------------------------------------------------------------------------------
# Encoding on every GPU, and search
# ---------------------------------------------------------------------------------------------


class GpuMemorySampler:
    """Peak memory used on each GPU, and which processes hold a context on it, sampled by nvidia-smi."""

    def __init__(self, period: float = 0.2):
        self.period, self.peak_mib, self.processes = period, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _query(self, what: str, fields: str) -> list[list[str]]:
        output = subprocess.run(["nvidia-smi", f"--query-{what}={fields}", "--format=csv,noheader,nounits"],
                                capture_output=True, text=True, timeout=10).stdout
        return [[cell.strip() for cell in line.split(",")] for line in output.splitlines() if line.strip()]

    def _sample(self) -> None:
        index_of = {bus: index for index, bus in self._query("gpu", "index,pci.bus_id")}
        while not self._stop.is_set():
            for index, used in self._query("gpu", "index,memory.used"):
                self.peak_mib[int(index)] = max(self.peak_mib.get(int(index), 0), int(float(used)))
            for bus, pid in self._query("compute-apps", "gpu_bus_id,pid"):
                self.processes.setdefault(int(index_of.get(bus, -1)), set()).add(pid)
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def encode_images(work: Path, count: int) -> Path:
    from bench_encode import generated_jpegs

    folder = work / "photos"
    generated_jpegs(folder, count)
    return folder


def check_encode(inputs: dict, work: Path, gpus: int, cpu_dry_run: bool, checkpoint: Path) -> str:
    import torch
    import torch.nn.functional as F

    from clipsearch.checkpoint import load_bundle
    from clipsearch.data import load_image
    from clipsearch.encoding.mapper import ImageEmbedder
    from clipsearch.store import MANIFEST_FILE, list_shards, read_shard

    devices = 2 if cpu_dry_run else gpus
    photos = encode_images(work, ENCODE_IMAGES_PER_GPU * devices)
    expected = {str(path) for path in photos.iterdir()}
    emb_path = work / "emb"
    command = [sys.executable, "-m", "clipsearch.cli.encode", f"--load_model={checkpoint}", f"--dataset_path={photos}",
               f"--emb_path={emb_path}", f"--devices={devices}", f"--accelerator={'cpu' if cpu_dry_run else 'gpu'}",
               f"--precision={'32' if cpu_dry_run else '16-mixed'}", "--batch_size=128", "--shard_size=500",
               "--overwrite", "--no_progress"]
    sampler = GpuMemorySampler() if not cpu_dry_run else None
    started = time.perf_counter()
    if sampler is not None:
        with sampler:
            completed = subprocess.run(command, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, cwd=REPO)
    else:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, cwd=REPO)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"encode failed:\n{completed.stderr[-3000:]}")
    print(completed.stdout.strip())
    seen: dict[str, torch.Tensor] = {}
    for shard_path in list_shards(emb_path):
        shard = read_shard(shard_path)
        for path, embedding in zip(shard["path"], shard["emb"]):
            if path in seen:
                raise AssertionError(f"{path} encoded twice")
            seen[path] = embedding
    if set(seen) != {os.path.realpath(path) for path in expected} and set(seen) != expected:
        raise AssertionError(f"{len(seen)} images encoded, {len(expected)} in the folder")
    if not (emb_path / MANIFEST_FILE).exists():
        raise AssertionError("no manifest.json: the run does not look complete")
    # The GPU's (fp16 autocast) embeddings against the CPU's fp32 ones for a few images.
    bundle = load_bundle(checkpoint)
    sample = sorted(seen)[:32]
    embedder = ImageEmbedder(bundle.model, "cpu", "32", bundle.image_views)
    reference = embedder(torch.stack([bundle.eval_transform(load_image(path)) for path in sample]))
    agreement = F.cosine_similarity(reference, torch.stack([seen[path] for path in sample]), dim=-1).min().item()
    if agreement < 0.99:
        raise AssertionError(f"embeddings differ from the CPU's: lowest cosine {agreement:.4f}")
    detail = (f"{len(seen)} images on {devices} {'CPU processes' if cpu_dry_run else 'GPUs'} in {seconds:.0f} s "
              f"(whole command), each once; lowest cosine to the CPU's fp32 embedding {agreement:.4f}")
    if sampler is not None:
        memory = ", ".join(f"GPU {index}: {mib} MiB" for index, mib in sorted(sampler.peak_mib.items()))
        crowded = {index: len(pids) for index, pids in sampler.processes.items() if len(pids) > 1}
        print(f"peak memory used: {memory}; processes seen per GPU: "
              f"{ {index: len(pids) for index, pids in sorted(sampler.processes.items())} or 'none visible to nvidia-smi'}")
        if crowded:
            raise AssertionError(f"several encoding processes on one GPU: {crowded} ({memory})")
        detail += f"; peak memory {memory}"
    return detail


def check_search(work: Path, checkpoint: Path) -> str:
    answers = {}
    for storage in ("fp16", "fp32"):
        command = [sys.executable, "-m", "clipsearch.cli.search", f"--load_model={checkpoint}",
                   f"--emb_path={work / 'emb'}", "--query=a red circle", "--top_k=5", "--json",
                   f"--out_dir={work / 'search' / storage}", *(["--fp16"] if storage == "fp16" else [])]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, cwd=REPO)
        if completed.returncode != 0:
            raise RuntimeError(f"search --{storage} failed:\n{completed.stderr[-3000:]}")
        answers[storage] = json.loads(completed.stdout.strip().splitlines()[-1])
    if not (work / "search" / "fp16" / "a red circle.png").exists():
        raise AssertionError("no 'a red circle.png' grid saved")
    hits = {storage: answer["results"] for storage, answer in answers.items()}
    if len(hits["fp16"]) != 5 or hits["fp16"][0]["path"] != hits["fp32"][0]["path"]:
        raise AssertionError(f"fp16 top hits {hits['fp16'][:2]} against fp32 {hits['fp32'][:2]}")
    gap = max(abs(a["score"] - b["score"]) for a, b in zip(hits["fp16"], hits["fp32"]))
    return f"--fp16 answers with fp32's top hit, scores within {gap:.1e}; grid saved"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    only = set(args.only.split(",")) if args.only else {"train", "ddp", "encode", "search"}
    gpus = torch.cuda.device_count()
    if not gpus and not args.cpu_dry_run:
        print("gpu_check: PyTorch sees no CUDA GPU; --cpu_dry_run tries the steps on the CPU", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, {gpus} GPU(s): "
          f"{', '.join(torch.cuda.get_device_name(index) for index in range(gpus)) or 'none (CPU dry run)'}")
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    checks = Checks()
    inputs = make_inputs(work)
    accelerator = "cpu" if args.cpu_dry_run else "gpu"
    precisions = ("bf16-mixed",) if args.cpu_dry_run else PRECISIONS
    if "train" in only:
        for door in DOORS:
            for precision in precisions:
                if precision == "bf16-mixed" and not args.cpu_dry_run and not torch.cuda.is_bf16_supported():
                    checks.run(f"train {door} {precision}", lambda: Skip("this GPU has no bf16"))
                    continue
                checks.run(f"train {door} {precision}",
                           lambda door=door, precision=precision: check_door(door, precision, inputs, work, accelerator))
    if "ddp" in only:
        checks.run("ddp 2 GPUs vs 2 gloo processes", lambda: check_ddp(inputs, work, gpus, args.cpu_dry_run))
    checkpoint = work / "models" / f"pretrain_openai-{precisions[0]}-whole" / "best.ckpt"
    if "encode" in only or "search" in only:
        if not checkpoint.exists():  # the training checks were left out: a checkpoint of the right format
            from clipsearch.checkpoint import save_bundle
            from clipsearch.models import build_from_spec
            from clipsearch.models.openai_clip import openai_clip_spec

            torch.manual_seed(0)
            checkpoint = save_bundle(build_from_spec(openai_clip_spec("ViT-Tiny-16", image_size=64)),
                                     work / "models" / "untrained.ckpt")
    if "encode" in only:
        checks.run(f"encode --devices {2 if args.cpu_dry_run else gpus}",
                   lambda: check_encode(inputs, work, gpus, args.cpu_dry_run, checkpoint))
    if "search" in only:
        checks.run("search --fp16", lambda: check_search(work, checkpoint))
    return checks.summary(argv, args.report)


if __name__ == "__main__":
    sys.exit(main())
