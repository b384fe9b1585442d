"""`imagic batch`: many independent edits from a manifest, spread over processes with torch.distributed.

    imagic batch MANIFEST --ckpt MODEL --out DIR [edit settings]              one process
    torchrun --nproc_per_node 8 -m imagic.cli batch MANIFEST --ckpt MODEL --out DIR   (any number of nodes)

Manifest: one edit per entry, `image` (relative to the manifest's folder) and `target_text`, optionally `seed` (the
training seed) and any other stage 1-3 setting for that edit only (`embed_steps`, `finetune`, `alpha`, `seeds`,
`guidance_scale`, ...; the command line gives the defaults). Formats:
- JSON Lines (`.jsonl`): one object per line;
- CSV (`.csv`): a header row with those names; list values (alpha, seeds) separated by spaces;
- JSON (`.json`): a list of objects, such as TEdBench's `input_list.json`, whose `img_name` lies in the
  manifest folder's `originals/`.

Output (DIR):
    NNN-<image>-<text>/     one run directory per edit (rundir.py), resumed if it exists, plus
        DONE                written last, JSON: samples, grid, metrics; its presence means "finished"
        FAILED              the error of the last attempt (removed when the edit is tried again)
        metrics.csv, tradeoff.png    per sample metrics; CLIP score vs LPIPS over alpha (with both metrics)
    summary.csv             one row per edit: status, run directory, grid, metrics per alpha
    metrics.csv             one row per sample (edit, seed, alpha) with every metric
    contact_sheet.png       one row per edit: the input, then its samples

Work is split statically: process `rank` of `world_size` takes the edits i with i % world_size == rank, so a
restart gives every process the same edits again; there is no scheduler. Finished edits are skipped, unfinished
ones resume where their run directory stopped, and a failed edit is recorded and does not stop the others. After
a barrier, rank 0 writes the summary. Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment) the
processes join a gloo process group: it only carries that barrier (no tensors are exchanged), which gloo does on
CPU and GPU machines alike, without NCCL's watchdog timing out a rank that waits hours for the slowest one. DIR
must be on a filesystem all nodes share.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from .arguments import (EXIT_USER_ERROR, UserError, add_fit_args, add_model_args, add_recipe_arg, add_sample_args,
                        make_editor, parse_device, recipe_in, settings_from, user_errors)
from .batch_report import edit_state, mean_over_seeds, write_summary
from .fileio import PathLike, write_csv, write_json, write_text
from .images import save_png
from .manifest import BatchSettings, Edit, ManifestError, read_manifest, shard, split
from .metrics import EditMetrics, MetricsError, plot_tradeoff
from .settings import FitSettings, SampleSettings

log = logging.getLogger(__name__)

BARRIER_TIMEOUT = datetime.timedelta(days=7)  # ranks that finish early wait at the barrier for the slowest one


# --- running ----------------------------------------------------------------------------------------------------

def run_edit(editor, edit: Edit, directory: Path, s: BatchSettings) -> Dict[str, Any]:
    """Fit (resuming), sample, measure; returns what DONE records."""
    fit, sample = split(edit.overrides, s.fit, s.sample)
    start = time.time()
    run = editor.fit(edit.image, edit.target_text, out=directory, settings=fit, force=s.force)
    result = editor.sample(run, sample, force=s.force)
    rows = [{"seed": seed, "alpha": a, **s.metrics(img, run.input_image, edit.target_text)}
            for (seed, a), img in sorted(result.images.items())]
    names = ["seed", "alpha"] + s.metrics.names
    write_csv(directory / "metrics.csv", names, [[r[k] for k in names] for r in rows])
    if "clip_score" in s.metrics.names and "lpips" in s.metrics.names:
        alphas = sorted({r["alpha"] for r in rows})
        points = [(a, mean_over_seeds(rows, a, "clip_score"), mean_over_seeds(rows, a, "lpips")) for a in alphas]
        save_png(plot_tradeoff(points, title=f"{edit.index}: {edit.target_text[:50]}"), directory / "tradeoff.png")
    return {"status": "done", "index": edit.index, "target_text": edit.target_text,
            "samples": {f"{seed}:{a:g}": str(path) for (seed, a), path in result.paths.items()},
            "grid": str(result.grid_path), "metrics": rows, "seconds": round(time.time() - start, 1)}


def run_shard(get_editor: Callable[[], Any], edits: Sequence[Edit], out: PathLike, s: BatchSettings,
              rank: int = 0, world_size: int = 1, echo: Callable[[str], None] = log.info) -> Dict[int, str]:
    """Run this process's share of the edits; returns {index: "done" | "skipped" | "failed"}.

    `get_editor()` (cached by the caller) is first called for the first unfinished edit, so a restart with
    nothing left to do does not load the checkpoint. Any exception inside an edit is recorded in its FAILED file
    and the next edit starts; only an interrupt (KeyboardInterrupt) stops the loop.
    """
    out = Path(out)
    status: Dict[int, str] = {}
    mine = shard(len(edits), rank, world_size)
    for n, i in enumerate(mine):
        edit = edits[i]
        directory = out / edit.name
        if (directory / "DONE").is_file():
            echo(f"[rank {rank}] {n + 1}/{len(mine)} skip {edit.name}: done")
            status[i] = "skipped"
            continue
        editor = get_editor()  # outside the try: a checkpoint that does not load is no edit's failure
        (directory / "FAILED").unlink(missing_ok=True)
        echo(f"[rank {rank}] {n + 1}/{len(mine)} start {edit.name}")
        try:
            record = run_edit(editor, edit, directory, s)
        except Exception as e:  # noqa: BLE001 - one bad edit must not stop the batch; the error is recorded
            _record_failure(directory, e)
            _release_memory()
            echo(f"[rank {rank}] {n + 1}/{len(mine)} FAILED {edit.name}: {_one_line(e)}")
            status[i] = "failed"
            continue
        write_json(directory / "DONE", {**record, "rank": rank,
                                        "finished": datetime.datetime.now().isoformat(timespec="seconds")})
        echo(f"[rank {rank}] {n + 1}/{len(mine)} done {edit.name} ({record['seconds']} s)")
        status[i] = "done"
    return status


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}" if str(e).strip() else type(e).__name__


def _record_failure(directory: Path, e: BaseException) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    write_text(directory / "FAILED", _one_line(e) + "\n\n" + "".join(traceback.format_exception(e)))


def _release_memory() -> None:
    """After a failure (often CUDA out of memory) drop cached blocks so the next edit starts clean."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- distributed ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def distributed() -> Iterator[Tuple[int, int, int]]:
    """(rank, world_size, local_rank): a gloo process group under torchrun, a single process otherwise."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield 0, 1, 0
        return
    dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    try:
        yield dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    finally:
        dist.destroy_process_group()


def barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


# --- command line -----------------------------------------------------------------------------------------------

def configure_parser(p: argparse.ArgumentParser, recipe: str = "paper") -> None:
    p.add_argument("manifest", help="edits: .jsonl / .csv / .json list (e.g. TEdBench's input_list.json)")
    p.add_argument("--out", required=True, help="output folder: one run directory per edit, the summary")
    add_model_args(p)
    add_recipe_arg(p)
    add_fit_args(p, recipe)
    add_sample_args(p, recipe)
    m = p.add_argument_group("metrics (PSNR and SSIM against the input are always computed)")
    m.add_argument("--clip-weights", help="CLIP score: local open_clip checkpoint file or model folder")
    m.add_argument("--clip-arch", default="ViT-B-32", help="open_clip architecture of a --clip-weights file")
    m.add_argument("--lpips-weights", help="LPIPS: local lpips weights (a state dict, or the linear layers)")
    m.add_argument("--lpips-net", choices=["alex", "vgg"], default="alex", help="LPIPS backbone (default alex)")
    m.add_argument("--lpips-backbone", help="torchvision AlexNet/VGG16 weights, when --lpips-weights has only "
                                            "the linear layers")
    p.add_argument("--thumb-size", type=int, default=128, help="contact sheet cell size in pixels")


def add_batch_parser(subparsers, recipe: str = "paper") -> argparse.ArgumentParser:
    """Add the `batch` subcommand to `imagic`'s subparsers (its func is `cmd_batch`)."""
    p = subparsers.add_parser("batch", help="many edits from a manifest; spreads over processes under torchrun")
    configure_parser(p, recipe)
    p.set_defaults(func=cmd_batch)
    return p


def _device(args: argparse.Namespace, local_rank: int):
    """The process's device: under torchrun a bare "cuda" (or "auto" on a GPU machine) means cuda:LOCAL_RANK."""
    import torch

    dev = parse_device(args.device)
    return torch.device("cuda", local_rank) if dev.type == "cuda" and dev.index is None else dev


def _metrics(args: argparse.Namespace, device, echo: Callable[[str], None]) -> EditMetrics:
    from .metrics import LPIPS, ClipScorer

    clip = ClipScorer.from_local(args.clip_weights, args.clip_arch, device) if args.clip_weights else None
    lpips = LPIPS.from_files(args.lpips_weights, args.lpips_net, args.lpips_backbone, device) \
        if args.lpips_weights else None
    missing = [flag for flag, model in (("--clip-weights", clip), ("--lpips-weights", lpips)) if model is None]
    if missing:
        echo(f"metrics: PSNR, SSIM{'' if clip is None else ', CLIP score'}{'' if lpips is None else ', LPIPS'}; "
             f"for {' and '.join('CLIP score' if f == '--clip-weights' else 'LPIPS' for f in missing)} pass "
             f"{' / '.join(missing)} (local files; nothing is downloaded)")
    return EditMetrics(clip, lpips, device)


def cmd_batch(args: argparse.Namespace) -> int:
    """Returns 0 when every edit of the manifest is done, 1 when some failed (see summary.csv)."""
    def echo(line: str) -> None:
        print(line, flush=True)

    try:
        edits = read_manifest(args.manifest)
    except ManifestError as e:
        raise UserError(str(e)) from None
    with distributed() as (rank, world, local_rank):
        device = _device(args, local_rank)
        try:
            metrics = _metrics(args, device, echo if rank == 0 else log.info)
        except MetricsError as e:
            raise UserError(str(e)) from None
        settings = BatchSettings(fit=settings_from(FitSettings, args), sample=settings_from(SampleSettings, args),
                                 metrics=metrics, thumb_size=args.thumb_size, force=args.force)

        @functools.lru_cache(maxsize=None)
        def editor():  # `imagic edit`'s own loader, on this process's device
            return make_editor(argparse.Namespace(**{**vars(args), "device": str(device)}), args.ckpt)

        echo(f"[rank {rank}] {len(shard(len(edits), rank, world))} of {len(edits)} edits on {device}")
        run_shard(editor, edits, args.out, settings, rank, world, echo)
        barrier(world)
        if rank != 0:
            return 0
        paths = write_summary(edits, args.out, settings)
    states = [edit_state(Path(args.out) / e.name)[0] for e in edits]
    echo(f"{states.count('done')} done, {states.count('failed')} failed, {states.count('pending')} pending; "
         f"wrote {paths['summary']}, {paths['metrics']} and {paths['contact_sheet']}")
    return 0 if states.count("done") == len(edits) else 1


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m imagic.batch ...`, the same as `imagic batch ...` (torchrun can launch either with `-m`)."""
    p = argparse.ArgumentParser(prog="imagic batch", description="many Imagic edits from a manifest")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    configure_parser(p, recipe_in(argv))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return cmd_batch(args)
    except user_errors() as e:
        print(f"imagic: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
