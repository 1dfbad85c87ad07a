"""The network and the SGD loop of VOC07 classification by fine-tuning (``voc07-cls``; the
DeepCluster paper's ``eval_voc_classif.py``).

- :func:`build_finetune_net`: a deep COPY of the backbone cut by :mod:`dcbench.finetune`: for
  DeepCluster AlexNet/VGG16 its conv trunk and its own fc6/fc7 re-initialised N(0, 0.01) with
  bias 0.1 (fc6 rebuilt for the input size when needed); for any other backbone its last tap,
  globally averaged (a ViT: its ``cls`` token), and a new ``Dropout, Linear(C, head_dim), ReLU,
  Dropout, Linear, ReLU``;
  then a new ``Linear(., n_classes)`` (torch's default init, bias 0.1);
- :func:`finetune_and_score`: freeze per mode, train (BCE-with-logits summed over classes,
  difficult labels masked, lr halved every ``lr_step`` iterations, gradient norm clipped; the
  trunk stays in eval mode, as the paper's ``model.features.eval()``), check the trunk, then
  sum the logits of the test crops of every test image.

Data parallelism (``shard``, torchrun): the global batch is ``batch_size`` and each of the N
ranks reads ``batch_size / N`` images of it (every N-th image of the one-process order,
reshuffled per pass from the seed; a batch size N does not divide is refused). Training crops
and the random test crops depend on (seed, pass, image) only (:mod:`dcbench.data.seeded`): the
same with any ``workers``, and the global batches hold the one-process images and crops
(dropout draws per rank). Every rank holds the whole network (initialised
identically from the seed, then rank 0's copy broadcast); after each backward the gradients are
all-reduced weighted by each rank's image count (:func:`dcbench.parallel.average_gradients_`:
DistributedDataParallel's averaging, exact when the shares differ), so every rank clips and steps
the same gradient of the mean loss over the global batch. The trunk runs in eval mode, so no
BatchNorm statistic needs synchronising. Test scores: each rank scores its block of the test
images and the float64 score rows are gathered (exact), so every rank computes the same APs.

The loop reads its numbers from a settings object with the fields ``mode``,
``train_bn_affine``, ``iterations``, ``lr``, ``lr_step``, ``momentum``, ``weight_decay``,
``batch_size``, ``clip_norm``, ``image_size``, ``crop_scale``, ``test_crops``, ``seed``,
``workers`` and ``decode_cache_gb`` (the ``voc07-cls`` settings).
"""
from __future__ import annotations

import copy
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dcbench import finetune as ft
from dcbench import parallel
from dcbench.data import DataError, SkipCounter, cache_decoded_images, decoded_in_memory, normalised_batches
from dcbench.data.seeded import SeededBatches, SeededOrder, seeded_loader
from dcbench.data.transforms import InputConvention, convention_finetune_transform, convention_ten_crop_transform
from dcbench.data.voc import VOCSplit
from dcbench.errors import UsageError
from dcbench.features import rank_batches
from dcbench.progress import track


class FineTuneNet(nn.Module):
    """trunk -> (flatten) -> head (fc6, fc7) -> top (fc8): the network ``voc07-cls`` trains."""

    def __init__(self, trunk: nn.Module, head: nn.Sequential, top: nn.Linear, kind: str) -> None:
        super().__init__()
        self.trunk, self.head, self.top = trunk, head, top
        self.kind = kind
        #: trunk parameters the backbone itself keeps fixed (the Sobel filters): never trained
        self.fixed = ft.fixed_parameters(trunk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.top(self.head(torch.flatten(self.trunk(x), 1)))


def _mlp_head(in_dim: int, hidden: int) -> nn.Sequential:
    """AlexNet's classifier shape: Dropout, Linear, ReLU, Dropout, Linear, ReLU."""
    return nn.Sequential(nn.Dropout(0.5), nn.Linear(in_dim, hidden), nn.ReLU(inplace=True),
                         nn.Dropout(0.5), nn.Linear(hidden, hidden), nn.ReLU(inplace=True))


def _trunk_dim(trunk: nn.Module, image_size: int) -> int:
    trunk.eval()
    with torch.no_grad():
        try:
            return int(torch.flatten(trunk(torch.zeros(1, 3, image_size, image_size)), 1).shape[1])
        except (ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"image_size={image_size} does not fit this backbone ({first}); "
                             f"pick a larger image_size") from None


def _fit_first_linear(head: nn.Sequential, in_dim: int) -> nn.Sequential:
    """fc6 rebuilt when the trunk's output size differs (another input size): it is re-initialised anyway."""
    for i, layer in enumerate(head):
        if isinstance(layer, nn.Linear):
            if layer.in_features != in_dim:
                head[i] = nn.Linear(in_dim, layer.out_features)
            break
    return head


def build_finetune_net(backbone: nn.Module, n_classes: int, image_size: int, head_dim: int = 4096,
                       seed: int = 0) -> FineTuneNet:
    """A :class:`FineTuneNet` over a deep COPY of ``backbone`` (see the module docstring)."""
    net = copy.deepcopy(backbone).cpu()
    ft.drop_cluster_head(net)
    if ft.design_family(net) == "deepcluster":
        trunk, head = ft.Trunk(net.sobel, ft.conv_body(net)), net.classifier
        kind = "deepcluster: conv trunk + its fc6/fc7 (re-initialised)"
    elif ft.design_family(net) == "vit":
        # a ViT's image feature: the final-normed CLS token, the input of timm's / DeiT's / MAE's
        # fine-tuning head (VisionTransformer.forward_head, global_pool='token'); not a pooled block map
        tap = net.image_feature_tap
        ft.freeze_native_head(net)
        trunk, head, kind = ft.PooledTap(net, tap), None, f"ViT {tap} (final norm) + new fc6/fc7 MLP"
    else:
        tap = net.conv_tap_names[-1]
        ft.freeze_native_head(net)
        trunk, head, kind = ft.PooledTap(net, tap), None, f"global average pool of {tap} + new fc6/fc7 MLP"
    in_dim = _trunk_dim(trunk, image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = _mlp_head(in_dim, head_dim) if head is None else _fit_first_linear(head, in_dim)
        for layer in head:
            if isinstance(layer, nn.Linear):  # the paper's re-initialisation of fc6, fc7
                nn.init.normal_(layer.weight, 0.0, 0.01)
                nn.init.constant_(layer.bias, 0.1)
        last = [m for m in head if isinstance(m, nn.Linear)][-1]
        top = nn.Linear(last.out_features, n_classes)  # torch's default init, as the paper's new top layer
        nn.init.constant_(top.bias, 0.1)
    return FineTuneNet(trunk, head, top, kind)


def set_trainable(net: FineTuneNet, mode: str, train_bn_affine: bool) -> set[str]:
    """Freeze the trunk of ``net`` per ``mode`` (:func:`dcbench.finetune.set_trainable`);
    return the trunk tensors allowed to change. The Sobel filters stay frozen in both modes."""
    return ft.set_trainable(net.trunk, mode, train_bn_affine, net.fixed)


def lr_at(lr0: float, step: int, iteration: int) -> float:
    """The paper's schedule: lr0 halved every ``step`` iterations."""
    return lr0 * 0.5 ** (iteration // step)


def masked_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits against ``labels == 1``, difficult (0) entries masked, summed over
    classes and averaged over the batch (the paper's loss)."""
    loss = F.binary_cross_entropy_with_logits(logits, (labels == 1).float(), reduction="none")
    return loss.masked_fill(labels == 0, 0.0).sum() / labels.shape[0]


def finetune_transform(image_size: int, scale: Sequence[float],
                       convention: InputConvention | None = None) -> Callable:
    """RandomResizedCrop(s, scale, ratio 1) + flip, normalisation (train and random10 test): bilinear and
    ImageNet mean/std, or ``convention``'s filter, mean and std (published weights, issue 19)."""
    return convention_finetune_transform(image_size, scale, convention or InputConvention())


def _image_batches(ds: Any, order: Any, batch_size: int | None, settings: Any, device: str,
                   keep_decoded: bool = True) -> Iterable:
    """Seeded batches of ``ds`` (:func:`~dcbench.data.seeded.seeded_loader`) normalised on the device
    (the same inputs bit for bit); ``keep_decoded`` (data read more than once): its images decoded
    once when they fit ``decode_cache_gb``."""
    if keep_decoded:
        cache_decoded_images([ds], settings.decode_cache_gb)  # before the loader forks its workers
    return normalised_batches(ds, lambda d: seeded_loader(d, order, batch_size, settings.loader_workers(), device),
                              device)


def train_finetune(net: FineTuneNet, train: VOCSplit, settings: Any, device: str, progress: bool,
                   strict: bool = False, shard: tuple[int, int] | None = None,
                   convention: InputConvention | None = None) -> dict[str, Any]:
    """The SGD loop; returns a small log (losses every 10% of the run, skipped images). ``strict``:
    stop at the first unreadable image (``--strict``). ``shard``: ``(rank, world_size)`` of a
    data-parallel run (the module docstring)."""
    ds = train.dataset(finetune_transform(settings.image_size, settings.crop_scale, convention))
    ds.strict = strict
    if shard is not None and shard[1] > 1:
        return _train_finetune_parallel(net, train, ds, settings, device, progress, shard)
    order = SeededOrder(ds, settings.seed)  # crops depend on (seed, pass, image) only: any workers
    loader = _image_batches(ds, order, settings.batch_size, settings, device)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    counter, iteration, losses, epoch = SkipCounter(ds), 0, [], 0
    every = max(1, settings.iterations // 10)
    bar = ft.progress_bar(settings.iterations, "fine-tune", "it", progress)
    while iteration < settings.iterations:
        done_before = iteration
        order.set_epoch(epoch)
        epoch += 1
        net.train()
        net.trunk.eval()  # BatchNorm keeps its running statistics, in both modes
        for images, _t, idx, n_skipped in loader:
            counter.update(idx, n_skipped)
            if len(idx) == 0:
                continue
            for group in optimizer.param_groups:
                group["lr"] = lr_at(settings.lr, settings.lr_step, iteration)
            labels = torch.from_numpy(train.labels[idx.numpy()]).to(device)
            loss = masked_bce(net(images.to(device, non_blocking=True)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, settings.clip_norm)
            optimizer.step()
            iteration += 1
            if iteration % every == 0 or iteration == settings.iterations:
                losses.append([iteration, round(loss.item(), 5)])
            if bar is not None:
                bar.update(1)
            if iteration >= settings.iterations:
                break
        if iteration == done_before:
            raise DataError(f"no readable image in {train.voc_dir / 'JPEGImages'} for split {train.split}")
    ft.close_bar(bar)
    counter.report()
    return {"loss": losses, "skipped_train_images": counter.count, "decoded_in_memory": decoded_in_memory(ds)}


def _train_finetune_parallel(net: FineTuneNet, train: VOCSplit, ds: Any, settings: Any, device: str, progress: bool,
                             shard: tuple[int, int]) -> dict[str, Any]:
    """:func:`train_finetune` on rank ``shard[0]`` of a torchrun job: this rank's share of every
    global batch, gradients averaged over the global batch before clipping and stepping."""
    rank, world = shard
    parallel.broadcast_module_(net)  # one starting point, whatever each rank's BN re-estimation gave
    # rank r reads every world-th image of the one-process order, with the one-process crops
    sampler = SeededOrder(ds, settings.seed, world, rank)
    torch.manual_seed(zlib.crc32(f"{settings.seed}:finetune:{rank}".encode()))  # dropout per rank
    loader = _image_batches(ds, sampler, parallel.per_rank_batch(settings.batch_size, world), settings, device)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    skipped, iteration, losses, epoch = 0, 0, [], 0
    every = max(1, settings.iterations // 10)
    bar = ft.progress_bar(settings.iterations, "fine-tune", "it", progress)
    while iteration < settings.iterations:
        done_before = iteration
        sampler.set_epoch(epoch)
        epoch += 1
        net.train()
        net.trunk.eval()  # BatchNorm keeps its running statistics, in both modes
        for images, _t, idx, n_skipped in loader:
            skipped += int(n_skipped)
            optimizer.zero_grad(set_to_none=True)
            loss = torch.zeros((), device=device)
            if len(idx):
                labels = torch.from_numpy(train.labels[idx.numpy()]).to(device)
                loss = masked_bce(net(images.to(device, non_blocking=True)), labels)
                loss.backward()
            if not parallel.average_gradients_(params, len(idx)):
                continue  # no rank read an image of this batch: no step anywhere
            for group in optimizer.param_groups:
                group["lr"] = lr_at(settings.lr, settings.lr_step, iteration)
            torch.nn.utils.clip_grad_norm_(params, settings.clip_norm)
            optimizer.step()
            iteration += 1
            if iteration % every == 0 or iteration == settings.iterations:
                losses.append([iteration, round(loss.item(), 5)])  # this rank's share of the batch
            if bar is not None:
                bar.update(1)
            if iteration >= settings.iterations:
                break
        if iteration == done_before:
            raise DataError(f"no readable image in {train.voc_dir / 'JPEGImages'} for split {train.split}")
    ft.close_bar(bar)
    return {"loss": losses, "skipped_train_images": int(parallel.all_reduce_sum([skipped])[0]),
            "decoded_in_memory": decoded_in_memory(ds)}


@torch.no_grad()
def score_test_split(net: FineTuneNet, test: VOCSplit, settings: Any, device: str, progress: bool = False,
                     strict: bool = False, shard: tuple[int, int] | None = None,
                     convention: InputConvention | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Summed logits per test image (N x C) and the mask of images that could be read. With
    ``shard`` each rank scores its contiguous block of the test batches and every rank gets all
    the rows (gathered as float64: the sums are the ones this rank computed, bit for bit)."""
    tencrop = settings.test_crops == "tencrop"
    transform = (convention_ten_crop_transform(settings.image_size, convention or InputConvention()) if tencrop
                 else finetune_transform(settings.image_size, settings.crop_scale, convention))
    ds = test.dataset(transform)
    ds.strict = strict
    batch = max(1, settings.batch_size // 10) if tencrop else settings.batch_size
    # each rank scores its block of the one-process batches; the random crops of pass p are a
    # function of (seed, p, image), drawn apart from the training passes' (negative pass numbers)
    order = SeededBatches(rank_batches(len(ds), batch, shard or (0, 1)), settings.seed)
    passes = 1 if tencrop else 10  # the paper: 10 passes of random crops
    loader = _image_batches(ds, order, None, settings, device, keep_decoded=passes > 1)
    scores = np.zeros((len(ds), len(test.classes)), dtype=np.float64)
    seen = np.zeros(len(ds), dtype=bool)
    net.eval()
    for p in range(passes):
        order.set_epoch(-(p + 1))
        for images, _t, idx, _n in track(loader, f"test pass {p + 1}/{passes}", "batch", enabled=progress):
            if len(idx) == 0:
                continue
            images = images.to(device, non_blocking=True)
            if tencrop:  # B x 10 x 3 x s x s: sum the logits of each image's crops
                logits = net(images.flatten(0, 1)).view(len(idx), -1, scores.shape[1]).sum(1)
            else:
                logits = net(images)
            scores[idx.numpy()] += logits.double().cpu().numpy()
            seen[idx.numpy()] = True
    if shard is not None and shard[1] > 1:
        mine = np.flatnonzero(seen)
        for rows, part in parallel.all_gather_objects((mine, scores[mine])):
            scores[rows], seen[rows] = part, True
    return scores, seen


@dataclass
class FinetuneOutcome:
    """What :func:`finetune_and_score` returns."""

    log: dict[str, Any]  # losses, skipped training images
    trunk_check: dict[str, Any]  # :func:`dcbench.finetune.check_trunk`'s record
    scores: np.ndarray  # summed test logits, N x classes
    seen: np.ndarray  # test images that could be read


def finetune_and_score(net: FineTuneNet, train: VOCSplit, test: VOCSplit, settings: Any, device: str,
                       progress: bool, strict: bool = False, shard: tuple[int, int] | None = None,
                       convention: InputConvention | None = None) -> FinetuneOutcome:
    """Freeze per ``settings.mode``, train, check the trunk (RuntimeError when the freezing
    failed), then score the test split; the torch RNG is seeded from ``settings.seed`` and
    restored afterwards. ``shard``: data-parallel under torchrun (the module docstring)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        allowed = set_trainable(net, settings.mode, settings.train_bn_affine)
        net.to(device)
        guard = ft.TrunkGuard(net.trunk, allowed, settings.mode)
        log_ = train_finetune(net, train, settings, device, progress, strict, shard, convention)
        check = guard.check(settings.iterations)
        scores, seen = score_test_split(net, test, settings, device, progress, strict, shard, convention)
    return FinetuneOutcome(log_, check, scores, seen)
