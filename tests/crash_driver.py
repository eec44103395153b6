"""Crash-consistency driver: kill an encode, an index build, a querybank build and an export at
seeded random write points, rerun each, and check that nothing was lost, duplicated or half-written.

Run by tests/test_crash_consistency.py as `python tests/crash_driver.py <work folder> <seed> <kills>`;
prints one JSON summary. This process imports torch and the commands once; every run is a forked
child that sets durable's crash hook to SIGKILL itself at the chosen write point: a real kill (no
finally block, no cleanup, whatever was half-written stays), at a point counted in every file's
write, flush and rename, without paying a Python start-up per kill. A kill between two points
leaves the disk as a kill at the next point does, so the points cover every state a kill can leave.
"""
from __future__ import annotations

import os

# One thread everywhere: forked children must not inherit a thread pool's half-held locks.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import faiss  # noqa: E402, F401  imported before forking, so children do not each import it
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from clipsearch import durable  # noqa: E402
from clipsearch.cli.encode import main as encode_main  # noqa: E402
from clipsearch.cli.export_clip_retrieval import main as export_main  # noqa: E402
from clipsearch.cli.index import main as index_main  # noqa: E402
from clipsearch.cli.querybank import main as querybank_main  # noqa: E402
from clipsearch.clip_retrieval_export import MARKER_FILE, foreign_entry  # noqa: E402
from clipsearch.encoding import runner  # noqa: E402
from clipsearch.errors import UserError  # noqa: E402
from clipsearch.index import load_index  # noqa: E402
from clipsearch.mmap_store import ROWS_FILE, STORE_DIR, open_store  # noqa: E402
from clipsearch.models import released  # noqa: E402
from clipsearch.store import list_shards, load_collection, read_shard  # noqa: E402
from clipsearch.tars import write_tar  # noqa: E402

torch.set_num_threads(1)
torch.set_num_threads = lambda threads: None  # the encoder asks for a thread per core; a fork must not inherit them
faiss.omp_set_num_threads(1)


def _load_once(load: Callable) -> Callable:
    """The model is loaded once, here, and every forked child finds it in memory (a fifth of a run's time)."""
    loaded: dict = {}

    def load_model(reference):
        if str(reference) not in loaded:
            loaded[str(reference)] = load(reference)
        return loaded[str(reference)]

    return load_model


released.load_model = runner.load_model = _load_once(released.load_model)


class Run:
    """Forks a child that runs `command(argv)`, killing itself at write point `kill_at` (None: never)."""

    def __init__(self, log: Path):
        self.log = log

    def __call__(self, command: Callable, argv: list[str], kill_at: int | None = None) -> tuple[str, int]:
        """('killed' | 'finished' | 'failed', write points it passed)."""
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(read_end)
            log = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(log, 1)
            os.dup2(log, 2)
            passed = [0]

            def hook(label: str) -> None:
                passed[0] += 1
                if passed[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

            durable.set_crash_hook(hook)
            code = 0
            try:
                command(argv)
            except BaseException:  # noqa: BLE001 - reported through the exit code and the log
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os.write(write_end, str(passed[0]).encode())
            os._exit(code)
        os.close(write_end)
        _, status = os.waitpid(pid, 0)
        with os.fdopen(read_end) as pipe:
            passed = int(pipe.read() or 0)
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            return "killed", kill_at
        return ("finished" if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else "failed"), passed


def draw(path: Path, index: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (40, 40), ((index * 67) % 256, (index * 131) % 256, (index * 29) % 256))
    image.putpixel((index % 40, 0), (255, 0, 0))
    image.save(path)


def leftovers(folder: Path) -> list[str]:
    """Temporaries, locks and half-made folders a finished run must not leave."""
    return [str(path.relative_to(folder)) for path in folder.rglob("*")
            if durable.TEMPORARY_PATTERN.match(path.name) or path.name.endswith((".tmp", durable.LOCK_SUFFIX))]


def rows_of(emb: Path) -> dict[str, torch.Tensor]:
    collection = load_collection(emb)
    return {path: collection.embeddings[row].clone() for row, path in enumerate(collection.paths)}


def compare(got: list[str], expected: list[str]) -> tuple[int, int]:
    """(lost, duplicated): expected items missing from `got`, and items `got` holds more than once."""
    return len(set(expected) - set(got)), len(got) - len(set(got))


class Scenario:
    """One command, killed from the same starting folder at many points and rerun each time."""

    name = ""

    def __init__(self, work: Path, run: Run, fixtures: dict):
        self.work, self.run, self.fixtures = work / self.name, run, fixtures
        self.work.mkdir()
        self.start = self.work / "start"
        self.prepare(self.start)
        self.reference = self.work / "reference"
        shutil.copytree(self.start, self.reference, symlinks=True)
        outcome, self.points = self.run(self.command, self.argv(self.reference))
        assert outcome == "finished", f"{self.name}: the uninterrupted run {outcome}; see {run.log}"

    def trial(self, kill_at: int) -> dict:
        folder = self.work / f"killed-at-{kill_at}-{time.monotonic_ns()}"
        shutil.copytree(self.start, folder, symlinks=True)
        outcome, _ = self.run(self.command, self.argv(folder), kill_at)
        result = {"point": kill_at, "killed": outcome == "killed", "half_written": 0, "lost": 0, "duplicated": 0,
                  "leftovers": [], "rerun": None, "problems": []}
        try:
            self.check_after_kill(folder)
        except Exception as error:  # noqa: BLE001 - every way a half state shows is counted
            result["half_written"] = 1
            result["problems"].append(f"after the kill: {type(error).__name__}: {error}")
        result["rerun"], _ = self.run(self.command, self.argv(folder))
        if result["rerun"] == "finished":
            try:
                result["lost"], result["duplicated"] = self.check_after_rerun(folder)
            except Exception as error:  # noqa: BLE001
                result["problems"].append(f"after the rerun: {type(error).__name__}: {error}")
            result["leftovers"] = leftovers(folder)
        shutil.rmtree(folder)
        return result

    # What each scenario defines
    command: Callable

    def prepare(self, folder: Path) -> None:
        raise NotImplementedError

    def argv(self, folder: Path) -> list[str]:
        raise NotImplementedError

    def check_after_kill(self, folder: Path) -> None:
        raise NotImplementedError

    def check_after_rerun(self, folder: Path) -> tuple[int, int]:
        raise NotImplementedError


def encode_argv(fixtures: dict, dataset: Path, emb: Path) -> list[str]:
    return ["--load_model", str(fixtures["checkpoint"]), "--dataset_path", str(dataset), "--emb_path", str(emb),
            "--num_workers", "0", "--no_progress", "--accelerator", "cpu", "--batch_size", "2", "--shard_size", "2"]


class EncodeUpdate(Scenario):
    """An update of an encoded folder: 5 images added, 1 deleted, 1 rewritten."""

    name = "encode"
    command = staticmethod(encode_main)

    def prepare(self, folder: Path) -> None:
        shutil.copytree(self.fixtures["base_emb"], folder / "emb")
        self.base = rows_of(folder / "emb")

    def argv(self, folder: Path) -> list[str]:
        return encode_argv(self.fixtures, self.fixtures["photos"], folder / "emb")

    @property
    def expected(self) -> dict[str, torch.Tensor]:
        if not hasattr(self, "_expected"):
            self._expected = rows_of(self.reference / "emb")
        return self._expected

    def check_after_kill(self, folder: Path) -> None:
        for shard in list_shards(folder / "emb"):
            read_shard(shard)
        rows = rows_of(folder / "emb")
        if set(rows) == set(self.base) and all(torch.equal(rows[path], self.base[path]) for path in rows):
            return  # killed before the update's record: the folder as it was
        stale = set(rows) - set(self.expected)
        assert not stale, f"a deleted or replaced image is still served: {sorted(stale)[:2]}"
        for path, embedding in rows.items():
            torch.testing.assert_close(embedding, self.expected[path], atol=1e-5, rtol=0)

    def check_after_rerun(self, folder: Path) -> tuple[int, int]:
        emb = folder / "emb"
        assert (emb / "manifest.json").is_file(), "no manifest after the rerun"
        collection = load_collection(emb)
        for row, path in enumerate(collection.paths):
            torch.testing.assert_close(collection.embeddings[row], self.expected[path], atol=1e-5, rtol=0)
        # Rows written by this update's shards, across all of them: an image encoded twice shows here.
        update = json.loads((emb / "update-001.json").read_text())
        encoded = [path for name in update["shards"] for path in read_shard(emb / name)["path"]]
        lost, duplicated = compare(collection.paths, list(self.expected))
        return lost, duplicated + len(encoded) - len(set(encoded))


class EncodeTarsUpdate(EncodeUpdate):
    """An update of a collection of webdataset tars: one tar rewritten, one left out, two added.

    A tar is the unit of resuming: a kill between its batches must neither keep half of it nor
    encode any of its samples twice.
    """

    name = "encode_tars"

    def prepare(self, folder: Path) -> None:
        shutil.copytree(self.fixtures["base_tars_emb"], folder / "emb")
        self.base = rows_of(folder / "emb")

    def argv(self, folder: Path) -> list[str]:
        return encode_argv(self.fixtures, self.fixtures["tars_pattern"], folder / "emb")


class IndexBuild(Scenario):
    """Rebuilding the index (and the consolidated store) of a folder whose update made both stale."""

    name = "index"
    command = staticmethod(index_main)

    def prepare(self, folder: Path) -> None:
        shutil.copytree(self.fixtures["stale_index_emb"], folder / "emb")

    def argv(self, folder: Path) -> list[str]:
        return ["--emb_path", str(folder / "emb"), "--kind", "flat"]

    def check_after_kill(self, folder: Path) -> None:
        emb = folder / "emb"
        if (emb / STORE_DIR).exists():  # a store folder is whole: its record last, its rows all there
            info = json.loads((emb / STORE_DIR / "store.json").read_text())
            assert (emb / STORE_DIR / "embeddings.f16").stat().st_size == info["count"] * info["dim"] * 2
            with pa.memory_map(str(emb / STORE_DIR / ROWS_FILE)) as rows:
                assert pa.ipc.open_file(rows).read_all().num_rows == info["count"]
        try:
            index = load_index(emb)
        except (UserError, FileNotFoundError):
            return  # refused in one line (a pair from two builds), or none yet: never read half
        assert index.count == index.info["count"]

    def check_after_rerun(self, folder: Path) -> tuple[int, int]:
        emb, reference = folder / "emb", self.reference / "emb"
        index = load_index(emb)
        assert (emb / "index.faiss").read_bytes() == (reference / "index.faiss").read_bytes()
        info, expected = (json.loads((path / "index.json").read_text()) for path in (emb, reference))
        info.pop("build_seconds"), expected.pop("build_seconds")
        assert info == expected
        store = open_store(emb)
        assert store is not None and store.order_fingerprint == index.order_fingerprint
        count = len(load_collection(emb).paths)
        return max(0, count - index.count), max(0, index.count - count)


class QueryBankBuild(Scenario):
    """Recomputing the querybank of a folder whose update made the old one stale."""

    name = "querybank"
    command = staticmethod(querybank_main)

    def prepare(self, folder: Path) -> None:
        shutil.copytree(self.fixtures["stale_querybank_emb"], folder / "emb")

    def argv(self, folder: Path) -> list[str]:
        return ["--emb_path", str(folder / "emb"), "--load_model", str(self.fixtures["checkpoint"]),
                "--dataset_path", str(self.fixtures["captions"]), "--split", "train"]

    def check_after_kill(self, folder: Path) -> None:
        bank = torch.load(folder / "emb" / "querybank.pt", weights_only=True)  # the old one or the new one, whole
        assert bank["bias"].ndim == 1

    def check_after_rerun(self, folder: Path) -> tuple[int, int]:
        got = torch.load(folder / "emb" / "querybank.pt", weights_only=True)
        expected = torch.load(self.reference / "emb" / "querybank.pt", weights_only=True)
        assert torch.equal(got["bias"], expected["bias"]) and got["order_fingerprint"] == expected["order_fingerprint"]
        count = len(load_collection(folder / "emb").paths)
        return max(0, count - len(got["bias"])), max(0, len(got["bias"]) - count)


class Export(Scenario):
    """Replacing an earlier export (of the collection before the update) beside the user's own file."""

    name = "export"
    command = staticmethod(export_main)

    def prepare(self, folder: Path) -> None:
        shutil.copytree(self.fixtures["updated_emb"], folder / "emb")
        shutil.copytree(self.fixtures["base_export"], folder / "out")
        (folder / "mine.txt").write_text("the user's")
        self.emb_files = self.files(folder / "emb")

    def argv(self, folder: Path) -> list[str]:
        return ["--emb_path", str(folder / "emb"), "--out", str(folder / "out"), "--rows_per_file", "4"]

    @staticmethod
    def files(folder: Path) -> dict[str, bytes]:
        return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.glob("*")) if path.is_file()}

    def check_after_kill(self, folder: Path) -> None:
        assert (folder / "mine.txt").read_text() == "the user's"
        assert {name: data for name, data in self.files(folder / "emb").items() if not name.endswith(".lock")} == \
            self.emb_files, "the embedding folder changed"
        out = folder / "out"
        if out.exists():  # the old export or the new one, whole
            assert foreign_entry(out) is None
            marker = json.loads((out / MARKER_FILE).read_text())
            rows = sum(np.load(path).shape[0] for path in (out / "img_emb").iterdir())
            paths = sum(pq.read_table(path).num_rows for path in (out / "metadata").iterdir())
            assert marker["rows"] == rows == paths

    def check_after_rerun(self, folder: Path) -> tuple[int, int]:
        self.check_after_kill(folder)
        got, expected = folder / "out", self.reference / "out"
        names = sorted(str(path.relative_to(got)) for path in got.rglob("*") if path.is_file())
        assert names == sorted(str(path.relative_to(expected)) for path in expected.rglob("*") if path.is_file())
        for name in names:
            assert (got / name).read_bytes() == (expected / name).read_bytes(), name
        assert sorted(path.name for path in folder.iterdir()) == ["emb", "mine.txt", "out"]
        exported = [path for table in sorted((got / "metadata").iterdir())
                    for path in pq.read_table(table).column("image_path").to_pylist()]
        return compare(exported, load_collection(folder / "emb").paths)


def make_fixtures(work: Path) -> dict:
    """The starting folders, made by running the commands in this process: the imports and caches they
    warm up are then shared by every forked child, which starts in milliseconds."""
    from clipsearch.checkpoint import save_bundle
    from clipsearch.models import build_from_spec
    from clipsearch.models.openai_clip import openai_clip_spec

    torch.manual_seed(0)
    fixtures = {"checkpoint": save_bundle(build_from_spec(openai_clip_spec("ViT-Tiny-16")), work / "tiny.ckpt")}
    photos = fixtures["photos"] = work / "photos"
    for index in range(8):
        draw(photos / f"sub{index % 2}" / f"img{index:03d}.png", index)
    base = fixtures["base_emb"] = work / "base_emb"
    encode_main(encode_argv(fixtures, photos, base))
    base_export = fixtures["base_export"] = work / "base_export"
    export_main(["--emb_path", str(base), "--out", str(base_export)])
    captions = fixtures["captions"] = work / "captions"
    captions.mkdir()
    words = ["red", "green", "blue", "dark", "bright", "small", "large", "round"]
    (captions / "train.tsv").write_text("image\tcaption\n" + "".join(
        f"img{index}.png\ta {words[index % 8]} {words[(index * 3) % 8]} square\n" for index in range(16)))
    stale_index, stale_bank = fixtures["stale_index_emb"], fixtures["stale_querybank_emb"] = (
        work / "stale_index_emb", work / "stale_querybank_emb")
    shutil.copytree(base, stale_index)
    index_main(["--emb_path", str(stale_index), "--kind", "flat"])
    shutil.copytree(base, stale_bank)
    querybank_main(["--emb_path", str(stale_bank), "--load_model", str(fixtures["checkpoint"]),
                    "--dataset_path", str(captions)])
    # The dataset changes: one image deleted, one rewritten (new bytes, later mtime), five added.
    (photos / "sub0" / "img000.png").unlink()
    draw(photos / "sub1" / "img001.png", 101)
    later = time.time_ns() + 10**9
    os.utime(photos / "sub1" / "img001.png", ns=(later, later))
    for index in range(8, 13):
        draw(photos / f"sub{index % 2}" / f"img{index:03d}.png", index)
    for folder in (stale_index, stale_bank):
        encode_main(encode_argv(fixtures, photos, folder))
    updated = fixtures["updated_emb"] = work / "updated_emb"
    shutil.copytree(base, updated)
    encode_main(encode_argv(fixtures, photos, updated))
    # Tars of three samples: 0-2 encoded, then 1 rewritten, 2 left out, 3 and 4 added.
    tars = work / "tars"
    for number in range(3):
        write_sample_tar(tars / f"{number:05d}.tar", range(number * 10, number * 10 + 3))
    base_tars = fixtures["base_tars_emb"] = work / "base_tars_emb"
    encode_main(encode_argv(fixtures, f"{tars}/{{00000..00002}}.tar", base_tars))
    write_sample_tar(tars / "00001.tar", range(50, 53))
    for number in (3, 4):
        write_sample_tar(tars / f"{number:05d}.tar", range(number * 10, number * 10 + 3))
    fixtures["tars_pattern"] = f"{tars}/{{00000,00001,00003,00004}}.tar"
    return fixtures


def write_sample_tar(path: Path, indices) -> None:
    samples = []
    for index in indices:
        draw(path.parent / "drawn.png", index)
        samples.append((f"{index:06d}", {"png": (path.parent / "drawn.png").read_bytes(), "txt": f"sample {index}".encode()}))
    (path.parent / "drawn.png").unlink()
    write_tar(path, samples, mtime=len(samples))


def main(work: Path, seed: int, kills: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    fixtures = make_fixtures(work)
    run = Run(work / "children.log")
    generator = random.Random(seed)
    summary = {"seed": seed}
    for scenario_type in (EncodeUpdate, EncodeTarsUpdate, IndexBuild, QueryBankBuild, Export):
        started = time.perf_counter()
        scenario = scenario_type(work, run, fixtures)
        points = [generator.randint(1, scenario.points) for _ in range(kills)]
        results = [scenario.trial(point) for point in points]
        summary[scenario.name] = {
            "write_points": scenario.points,
            "kills": sum(result["killed"] for result in results),
            "distinct_points": len(set(points)),
            "reruns_finished": sum(result["rerun"] == "finished" for result in results),
            "half_written": sum(result["half_written"] for result in results),
            "lost": sum(result["lost"] for result in results),
            "duplicated": sum(result["duplicated"] for result in results),
            "leftovers": sorted({name for result in results for name in result["leftovers"]}),
            "problems": [f"point {result['point']}: {problem}" for result in results for problem in result["problems"]],
            "seconds": round(time.perf_counter() - started, 1),
        }
    return summary


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))))
