"""``dcbench viz filters|maximize|top-images|training`` and ``dcbench report``.

Registered in :mod:`dcbench.cli` as ``main.add_command(viz_group, "viz")`` and
``main.add_command(report_command, "report")``. Heavy imports (torch models, matplotlib)
happen inside the commands so ``dcbench --help`` stays fast.
"""
from __future__ import annotations

import logging

import click

log = logging.getLogger("dcbench")

_arch_option = click.option("--arch", default=None, help="Architecture, when the checkpoint file does not tell.")
_trust_option = click.option("--trust-checkpoint", "trust", is_flag=True,
                             help="Allow full unpickling (can run code: only for files you trust).")
_device_option = click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N.")
_filters_option = click.option("--filters", default=None, metavar="I,J,...",
                               help="Filter indices, comma-separated (e.g. 0,5,9).")
_count_option = click.option("--count", type=int, default=None,
                             help="Show the first N filters instead of --filters  [default: 16]")
_size_option = click.option("--image-size", type=int, default=None,
                            help="Input side in pixels (default: the checkpoint's input size).")


def _load(spec: str, arch: str | None, trust: bool, device: str = "cpu"):
    """(loaded checkpoint, device) with the backbone on the device, in eval mode."""
    from dcbench.checkpoint import resolve_checkpoint
    from dcbench.train.distributed import pick_device

    loaded = resolve_checkpoint(spec, arch=arch, trust=trust)
    where = pick_device(device)
    loaded.backbone.to(where).eval()
    return loaded, where


@click.group("viz")
def viz_group() -> None:
    """Pictures of a checkpoint or a training run (the paper's Fig. 2-5)."""


@viz_group.command("filters")
@click.argument("ckpt")
@click.option("--layer", default=None, help="The first conv layer (default); other layers: use maximize.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The PNG to write.")
@click.option("--scale", type=int, default=4, show_default=True, help="Pixels per filter weight.")
@click.option("--columns", type=int, default=None, help="Filters per row (default: near-square grid).")
@_arch_option
@_trust_option
def filters_command(ckpt: str, layer: str | None, out: str, scale: int, columns: int | None,
                    arch: str | None, trust: bool) -> None:
    """First-layer filters of CKPT as an image grid.

    Each filter is contrast-normalised on its own; a Sobel model's filters are shown as seen
    through the fixed Sobel front end (grey 13x13 kernels for AlexNet), as in the paper's Fig. 3.
    """
    from dcbench.viz.filters import save_filter_grid

    loaded, _ = _load(ckpt, arch, trust)
    path = save_filter_grid(loaded.backbone, out, layer=layer, scale=scale, columns=columns)
    click.echo(f"wrote {path}")


@viz_group.command("maximize")
@click.argument("ckpt")
@click.option("--layer", default=None, help="Tap to visualise (default: the last conv layer, conv5 for AlexNet).")
@_filters_option
@_count_option
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--iterations", type=int, default=1000, show_default=True, help="Gradient-ascent steps.")
@click.option("--lr", type=float, default=1.0, show_default=True,
              help="Step size: RMS change per step in 0-255 pixel units (gradient normalised).")
@click.option("--weight-decay", type=float, default=1e-4, show_default=True,
              help="Per step, the image's deviation from grey shrinks by this fraction.")
@click.option("--blur-sigma", type=float, default=0.3, show_default=True, help="Gaussian blur sigma, pixels.")
@click.option("--blur-every", type=int, default=5, show_default=True, help="Blur every N steps (0: never).")
@_size_option
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the starting noise.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Filters optimised together.")
@_device_option
@_arch_option
@_trust_option
def maximize_command(ckpt: str, layer: str | None, filters: str | None, count: int | None, out: str,
                     iterations: int, lr: float, weight_decay: float, blur_sigma: float, blur_every: int,
                     image_size: int | None, seed: int, batch_size: int, device: str, arch: str | None,
                     trust: bool) -> None:
    """Filter visualisation by gradient ascent from noise.

    For each filter, an image is optimised to maximise the filter's mean activation, with
    normalised gradient steps, image weight decay and a periodic Gaussian blur. Writes
    OUT/LAYER-filterNNNN.png per filter and OUT/LAYER-grid.png.
    """
    from dcbench.viz import channel_count, choose_filters, resolve_layer
    from dcbench.viz.maximize import AscentSettings, maximize_filters, save_ascent

    settings = AscentSettings(iterations=iterations, lr=lr, weight_decay=weight_decay, blur_sigma=blur_sigma,
                              blur_every=blur_every, image_size=image_size, seed=seed, batch_size=batch_size)
    settings.validate()
    loaded, where = _load(ckpt, arch, trust, device)
    tap = resolve_layer(loaded.backbone, layer)
    size = image_size or loaded.backbone.input_size
    chosen = choose_filters(filters, count, channel_count(loaded.backbone, tap, size), tap)
    result = maximize_filters(loaded.backbone, tap, chosen, settings, device=where)
    paths = save_ascent(result, out)
    for f, a, b in zip(result.filters, result.start_activation, result.final_activation):
        log.info("%s filter %d: mean activation %.4g on the noise, %.4g after", tap, f, a, b)
    click.echo(f"wrote {len(paths) - 1} filter images and {paths[-1]}")


@viz_group.command("top-images")
@click.argument("ckpt")
@click.option("--data", required=True, type=click.Path(),
              help="Images: any folder (searched recursively) or a file list.")
@click.option("--layer", default=None, help="Tap to rank by (default: the last conv layer, conv5 for AlexNet).")
@_filters_option
@_count_option
@click.option("--k", type=int, default=9, show_default=True, help="Images kept per filter.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@_size_option
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True, help="Data loader worker processes.")
@_device_option
@click.option("--strict", is_flag=True, help="Stop at the first unreadable image (default: skip it and warn).")
@_arch_option
@_trust_option
def top_images_command(ckpt: str, data: str, layer: str | None, filters: str | None, count: int | None, k: int,
                       out: str, image_size: int | None, batch_size: int, workers: int, device: str, strict: bool,
                       arch: str | None, trust: bool) -> None:
    """The K images of --data that excite each filter most.

    One pass over the images, keeping only K per filter; writes OUT/LAYER-filterNNNN.png
    (best first), OUT/index.html and OUT/top_images.json.
    """
    from dcbench.data import unlabelled_images
    from dcbench.errors import UsageError
    from dcbench.viz import channel_count, choose_filters, resolve_layer
    from dcbench.viz.top_images import find_top_images, save_top_images

    if k < 1 or batch_size < 1 or workers < 0:
        raise UsageError("--k and --batch-size must be at least 1 and --workers at least 0")
    images = unlabelled_images(data)  # the data is checked before the checkpoint is loaded
    loaded, where = _load(ckpt, arch, trust, device)
    tap = resolve_layer(loaded.backbone, layer)
    size = image_size or loaded.backbone.input_size
    chosen = choose_filters(filters, count, channel_count(loaded.backbone, tap, size), tap)
    result = find_top_images(loaded.backbone, images, tap, chosen, k=k, image_size=size, batch_size=batch_size,
                             workers=workers, device=where, strict=strict)
    paths = save_top_images(result, out)
    click.echo(f"ranked {result.n_images} images; wrote {len(chosen)} grids and {paths[-2]}")


@viz_group.command("training")
@click.argument("run_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
def training_command(run_dir: str, out: str) -> None:
    """Plots of a training run: NMI, loss, k-means, clusters, times.

    Reads RUN_DIR/metrics.jsonl and the last epoch's assignments; writes nmi.png, loss.png,
    kmeans_objective.png, empty_clusters.png, cluster_sizes.png, time.png and overview.png.
    """
    from dcbench.viz.training import save_training_plots

    paths = save_training_plots(run_dir, out)
    click.echo(f"wrote {len(paths)} plots to {out}")


@click.command("report")
@click.option("--store", type=click.Path(dir_okay=False),
              help="Results database (default $DCBENCH_STORE or ~/.dcbench/results.db).")
@click.option("--run", "runs", multiple=True, type=click.Path(), help="A training run folder (repeatable).")
@click.option("--checkpoint", "checkpoints", multiple=True,
              help="Also show the first-layer filters of this checkpoint (repeatable).")
@click.option("--metric", "metrics", multiple=True, metavar="NAME",
              help="Metrics of the table and the per-layer curves (repeatable, globs ok); default 'headline': "
                   "each protocol's headline metric; 'all': every metric.")
@click.option("--tap", "taps", multiple=True, metavar="TAP", help="Only these taps (repeatable, globs ok).")
@click.option("--reference", help="Checkpoint row the table shows paired differences against.")
@click.option("--selection", type=click.Choice(["final", "best"]), default="final", show_default=True)
@click.option("--title", default="dcbench report", show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The HTML file to write.")
def report_command(store: str | None, runs: tuple[str, ...], checkpoints: tuple[str, ...], metrics: tuple[str, ...],
                   taps: tuple[str, ...], reference: str | None, selection: str, title: str, out: str) -> None:
    """One standalone HTML page: leaderboard, per-layer curves with 95% CIs, runs, filters.

    Images are embedded, so the file opens offline. Filter grids are drawn for each --run's
    checkpoint.pth and each --checkpoint.
    """
    from dcbench.leaderboard import HEADLINE
    from dcbench.viz.report import ReportInputs, load_results, write_report

    def listed(values: tuple[str, ...]) -> list[str]:
        return [v.strip() for text in values for v in text.split(",") if v.strip()]

    results, store_path = load_results(store)
    if store_path:
        log.info("results store: %s", store_path)
    else:
        from dcbench.results import default_store_path

        log.info("results store: %s does not exist yet (no results in the report)", default_store_path())
    inputs = ReportInputs(results=results, runs=list(runs), checkpoints=list(checkpoints),
                          metrics=listed(metrics) or [HEADLINE], taps=listed(taps) or None, reference=reference,
                          selection=selection, title=title, store=store_path)
    path = write_report(inputs, out)
    click.echo(f"wrote {path}")
