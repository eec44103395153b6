"""Where a training run spends its time, in our trainer and in open_clip's: sampled, and one step taken apart.

    .venv/bin/python benchmarks/profile_train.py --py_spy <path to py-spy>     # both parts
    .venv/bin/python benchmarks/profile_train.py --part step                   # no py-spy needed

The companion of bench_train.py, with the same trainers, model, data and flags.

- `--part sampled`: each trainer runs once under py-spy (`record --idle --threads`, 100 samples a
  second, DataLoader workers included); every sample of the main thread goes to the first phase
  whose functions are on its stack (imports, building the model, waiting for a batch, forward,
  loss, backward, optimiser, checkpoints, logging), and the workers' samples that decode or
  transform count as data work on the other core.
- `--part step`: one training step of the same model and batch in this process, taken apart
  (image forward, text forward, loss, backward, optimiser), open_clip's forward pass and AdamW
  against ours, interleaved.

Prints Markdown tables and writes nothing (no --report): BENCHMARKS.md's "Training: where the
time goes" quotes them by hand.
"""
from __future__ import annotations

import argparse
import collections
import copy
import re
import tempfile
import time
from pathlib import Path

import bench_train
import common

# (phase, pattern of a frame on the main thread's stack); the first phase that matches takes the sample.
MAIN_PHASES = (
    ("imports", r"^_find_and_load "),
    ("checkpoints", r"save_checkpoint|^save \(torch/serialization|_finish_run|^save_checkpoint"),
    ("backward", r"_engine_run_backward"),
    ("forward: image tower", r"(^|\.)encode_image \(|encode_pooled_image"),
    ("forward: text tower", r"(^|\.)encode_text \(|encode_pooled_text"),
    ("loss", r"(clipsearch/loss\.py|open_clip/loss\.py)"),
    ("optimiser", r"torch/optim/"),
    ("waiting for a batch", r"_next_data|DataLoader.*__next__|_BaseDataLoaderIter\.__next__"),
    ("building the model", r"build_openai|create_model_and_transforms|build_from_spec"),
    ("logging, progress, callbacks", r"(\.log |log_metrics|logging/|rich|progress|tensorboard|_call_callback_hooks)"),
)
WORKER_WORK = r"_worker_loop"
# The innermost frame of a worker waiting for its next index (not decoding).
IDLE_TOP = re.compile(r"(^|\.)(wait|select|poll|_poll|_recv|recv|recv_bytes|accept|get|sleep|acquire) \(")
SAMPLE = re.compile(r'^process (\d+):".*?";(thread \([^)]*\)[^;]*);(.*) (\d+)$')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("sampled", "step", "both"), default="both", help="which part to run")
    parser.add_argument("--py_spy", type=Path, default=None, help="the py-spy executable (the sampled part needs it)")
    parser.add_argument("--model", default="ViT-Small-16", help="as bench_train.py")
    parser.add_argument("--batch_size", type=int, default=64, help="as bench_train.py")
    parser.add_argument("--steps", type=int, default=30, help="steps of each sampled run")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers of both trainers")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved steps per contender in the step part")
    parser.add_argument("--work_dir", type=Path, default=common.work_dir("train"), help="scratch folder (bench_train's)")
    args = parser.parse_args(argv)
    if args.part in ("sampled", "both") and (args.py_spy is None or not args.py_spy.is_file()):
        parser.error("--part sampled needs --py_spy <path to the py-spy executable>")
    return args


def sampled_phases(raw: Path) -> dict[str, float]:
    """Seconds of each phase on the main thread, and of data work in the workers, from a py-spy raw file.

    A raw line is 'process <pid>:"<command>";thread (<id>)[: name];<function (file:line)>;... <count>'; the
    main thread is the one of the first process seen (the trainer, which starts before its workers)
    that runs the program's top frame.
    """
    seconds: collections.Counter = collections.Counter()
    main_process = main_thread = None
    for line in raw.read_text().splitlines():
        match = SAMPLE.match(line)
        if match is None:
            continue
        process, thread, stack, count = match.groups()
        frames = stack.split(";")
        samples = int(count) / 100
        if any(re.search(WORKER_WORK, frame) for frame in frames):
            if not IDLE_TOP.search(frames[-1]):
                seconds["data work in the workers (other core)"] += samples
            continue
        main_process = main_process or process
        if main_thread is None and process == main_process and frames[0].startswith("<module> "):
            main_thread = thread
        if (process, thread) != (main_process, main_thread):
            continue
        for phase, pattern in MAIN_PHASES:
            if any(re.search(pattern, frame) for frame in frames):
                seconds[phase] += samples
                break
        else:
            seconds["other"] += samples
    return dict(seconds)


def run_sampled(args) -> dict[str, dict[str, float]]:
    args.work_dir.mkdir(parents=True, exist_ok=True)
    dataset, tables = bench_train.prepare_data(args.work_dir, args.batch_size, [args.steps])
    bench_args = argparse.Namespace(model=args.model, batch_size=args.batch_size, workers=args.workers)
    results = {}
    for trainer in bench_train.TRAINERS:
        run_dir = args.work_dir / f"profile_{trainer}"
        if trainer == "ours":
            command = bench_train.our_command(bench_args, dataset, args.steps, run_dir)
        else:
            command = bench_train.open_clip_command(bench_args, tables[args.steps], run_dir)
        raw = Path(tempfile.mkdtemp(prefix="profile-train-")) / f"{trainer}.txt"
        spy = [str(args.py_spy), "record", "--idle", "--threads", "--subprocesses", "-r", "100", "-f", "raw",
               "-o", str(raw), "--"]
        started = time.perf_counter()
        bench_train.run_child(spy + command, run_dir)
        wall = time.perf_counter() - started
        results[trainer] = {"wall s": round(wall, 1), **sampled_phases(raw)}
    return results


def print_sampled(results: dict[str, dict[str, float]], steps: int) -> None:
    phases = [phase for phase, _ in MAIN_PHASES] + ["other", "data work in the workers (other core)"]
    print(f"\nSampled runs of {steps} steps (seconds; main thread, and the workers' data work)\n")
    print("| phase | ours s | ours % | open_clip s | open_clip % |")
    print("|---|---:|---:|---:|---:|")
    totals = {trainer: sum(v for k, v in result.items() if k not in ("wall s", phases[-1]))
              for trainer, result in results.items()}
    for phase in phases:
        cells = []
        for trainer in bench_train.TRAINERS:
            value = results[trainer].get(phase, 0.0)
            cells += [f"{value:.1f}", f"{100 * value / max(totals[trainer], 1e-9):.0f}"]
        print(f"| {phase} | {' | '.join(cells)} |")
    print(f"| main thread, all | {totals['ours']:.1f} | 100 | {totals['open_clip']:.1f} | 100 |")
    print(f"| wall clock | {results['ours']['wall s']:.1f} | | {results['open_clip']['wall s']:.1f} | |")


def run_step(args) -> dict[str, dict[str, float]]:
    """One step of open_clip's forward and AdamW against ours, on the same model and batch, interleaved."""
    import open_clip
    import torch

    from clipsearch.data import read_table
    from clipsearch.loss import ContrastiveLoss
    from clipsearch.models import build_from_spec
    from clipsearch.models.openai_clip import openai_clip_spec

    torch.manual_seed(0)
    dataset, _ = bench_train.prepare_data(args.work_dir, args.batch_size, [1])
    bundle = build_from_spec(openai_clip_spec(args.model))
    table = read_table(dataset, "train")
    tokens = bundle.tokenizer(list(table["caption"][: args.batch_size]))
    size = bundle.spec["image"]["size"]
    images = torch.randn(args.batch_size, 3, size, size)
    loss_fn = ContrastiveLoss()

    def contender(ours: bool):
        model = copy.deepcopy(bundle.model).train()
        if not ours:  # open_clip's forward passes and activation, its CPU AdamW (a loop over parameters)
            for module in model.modules():
                if hasattr(module, "mlp") and hasattr(module.mlp, "gelu"):
                    module.mlp.gelu = open_clip.transformer.QuickGELU()
        encode_image = model.encode_image if ours else (lambda batch: open_clip.CLIP.encode_image(model, batch))
        encode_text = model.encode_text if ours else (lambda batch: open_clip.CLIP.encode_text(model, batch))
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.2, fused=ours)
        parts: dict[str, list[float]] = collections.defaultdict(list)

        def step() -> None:
            marks = [time.perf_counter()]
            image_features = encode_image(images)
            marks.append(time.perf_counter())
            text_features = encode_text(tokens)
            marks.append(time.perf_counter())
            loss = loss_fn(image_features, text_features, model.logit_scale)
            marks.append(time.perf_counter())
            loss.backward()
            marks.append(time.perf_counter())
            optimizer.step()
            optimizer.zero_grad()
            marks.append(time.perf_counter())
            for name, start, end in zip(("image forward", "text forward", "loss", "backward", "optimiser"),
                                        marks, marks[1:]):
                parts[name].append((end - start) * 1000)

        return step, parts

    contenders = {"open_clip": contender(False), "ours": contender(True)}
    load_start = common.load_average()
    totals = common.interleaved_ms({name: step for name, (step, _) in contenders.items()}, args.repeats, warmup=2)
    results = {}
    for name, (_, parts) in contenders.items():
        results[name] = {part: common.median(values[-args.repeats:]) for part, values in parts.items()}
        results[name]["whole step"] = common.median(totals[name])
    results["load"] = {"start": load_start, "end": common.load_average()}
    return results


def print_step(results: dict) -> None:
    print(f"\nOne step in this process, ms (median of the interleaved repeats; load average {results['load']})\n")
    print("| part | open_clip's forward + AdamW loop | ours | open_clip / ours |")
    print("|---|---:|---:|---:|")
    for part in results["ours"]:
        theirs, ours = results["open_clip"][part], results["ours"][part]
        print(f"| {part} | {theirs:.1f} | {ours:.1f} | {theirs / max(ours, 1e-9):.2f} |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.part in ("sampled", "both"):
        load_start = common.load_average()
        print_sampled(run_sampled(args), args.steps)
        print(f"\nload average at start {load_start}, at end {common.load_average()}")
    if args.part in ("step", "both"):
        print_step(run_step(args))


if __name__ == "__main__":
    main()
